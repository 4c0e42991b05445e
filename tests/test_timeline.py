"""`--timeline FILE`: per-interval counters, console milestones, pmem flush records, and the SVG
that draws them (parsed back with xml.etree)."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from minivmm.stats import VcpuStats
from minivmm.timeline import (
    FIRST_LINE,
    INTERVAL,
    FlushRecord,
    IntervalSampler,
    Milestone,
    MilestoneScanner,
    Sample,
    TimelineData,
    intervals,
    render_svg,
)
from support.synthetic_kernels import smoke_pvh_elf
from test_pmem import Harness, backing, harness  # noqa: F401  (pytest fixtures, used by name)
from tinyguest import Asm, kick_handler, make_guest  # noqa: F401  (pytest fixtures, used by name)

REPO = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"
CONSOLE = b"booting\nRun /init as init process\nvirtio_pmem virtio0: pmem0 ready\nminivmm: powering off\n"


def svg_of(text: str) -> ET.Element:
    root = ET.fromstring(text)
    assert root.tag == f"{SVG}svg"
    return root


def series(root: ET.Element, cls: str) -> dict[str, list[tuple[float, float]]]:
    out = {}
    for el in root.iter(f"{SVG}polyline"):
        if el.get("class") == cls:
            out[el.get("data-name")] = [tuple(map(float, p.split(","))) for p in el.get("points", "").split()]
    return out


def milestones(root: ET.Element) -> list[str]:
    return [el.get("data-label") for el in root.iter(f"{SVG}line") if el.get("class") == "milestone"]


def test_scanner_finds_each_milestone_once_across_split_writes() -> None:
    clock = iter(range(100)).__next__
    scanner = MilestoneScanner(clock=lambda: float(clock()))
    for chunk in (b"\r\n", b"boo", b"ting\r\nRun /in", b"it as init process\n", b"Run /init again\n", b"pmem0: ok\n"):
        scanner.feed(chunk)
    assert [(m.label, m.line) for m in scanner.found] == [
        (FIRST_LINE, "booting"),
        ("init started", "Run /init as init process"),
        ("pmem0 probed", "pmem0: ok"),
    ]
    assert [m.t for m in scanner.found] == [0.0, 1.0, 3.0]  # one clock read per non-empty line


def test_sampler_snapshots_and_intervals_are_differences() -> None:
    stats, fallbacks = VcpuStats(), Counter[str]()
    sampler = IntervalSampler(stats, fallbacks)
    assert sampler.sample(10.0) == 10.0 + INTERVAL
    stats.by_kind["io"] += 3
    stats.by_device["serial"] += 3
    stats.time_in_run += 0.05
    fallbacks["int3"] += 1
    sampler.sample(10.2)
    (iv,) = intervals(sampler.samples, sampler.samples[0].t)
    assert iv.by_kind == {"io": 3} and iv.by_device == {"serial": 3} and iv.fallbacks == 1
    assert iv.time_in_run == 0.05 and iv.t0 == 0.0 and iv.t1 >= 0


def test_the_vcpu_loop_samples_every_exit_into_some_interval(make_guest) -> None:
    g = make_guest()
    assert g.loop.sampler is None  # off unless asked
    sampler = g.loop.record_timeline()
    a = Asm(16)
    a.mov_dx_imm(0x80)
    for _ in range(20):
        a.out_dx_acc(1)
    a.done()
    g.run_ok(a)
    ivs = intervals(sampler.samples, sampler.samples[0].t)
    assert sampler.samples[0].by_kind == {}  # the first exit opens the first interval
    total = Counter[str]()
    for iv in ivs:
        total.update(iv.by_kind)
    assert total == g.loop.stats.by_kind and total["io"] == 21  # the 20 writes and the done port
    first_run = sampler.samples[0].time_in_run  # the KVM_RUN up to the first exit, before time zero
    assert first_run > 0 and abs(sum(iv.time_in_run for iv in ivs) + first_run - g.loop.stats.time_in_run) < 1e-9


def test_a_pmem_flush_is_logged_only_when_asked(harness) -> None:  # noqa: F811
    harness.activate()
    harness.driver.add()
    harness.kick()
    harness.driver.wait_used(1)
    harness.wait_idle()
    assert harness.dev.flush_times is None  # off by default: nothing per request
    harness.dev.flush_times = []
    harness.driver.add()
    harness.driver.add()
    harness.kick()
    harness.driver.wait_used(3)
    harness.wait_idle()
    assert sum(f.requests for f in harness.dev.flush_times) == 2
    assert all(0 < f.service_time <= harness.dev.stats().service_time_max for f in harness.dev.flush_times)


def _sample(t: float, io: int, serial: int, t_in: float, fallbacks: int = 0) -> Sample:
    return Sample(t, {"io": io}, {"serial": serial}, t_in, 0.001 * io, {"fwait": fallbacks})


def test_svg_draws_every_series_panel_and_milestone() -> None:
    data = TimelineData(
        start=100.0,
        end=101.0,
        vcpus=[[_sample(100.0, 0, 0, 0.0), _sample(100.1, 40, 40, 0.08, 1), _sample(101.0, 50, 50, 0.9, 1)]],
        milestones=[Milestone(100.06, FIRST_LINE, "booting"), Milestone(100.06, "init started", "Run /init"), Milestone(100.9, "pmem0 probed", "pmem0")],
        flushes={"pmem0": [FlushRecord(100.5, 100.504, 2)]},
    )
    root = svg_of(render_svg(data))
    kinds, devices = series(root, "exits-kind"), series(root, "exits-device")
    assert set(kinds) == {"io"} and set(devices) == {"serial"}
    ys = sorted({y for _, y in kinds["io"]})
    assert len(ys) == 3  # 40 and 10 exits and the zero line
    assert set(series(root, "run-in")) == {"inside KVM_RUN"} and set(series(root, "run-out")) == {"outside (VMM)"}
    assert [el.get("class") for el in root.iter(f"{SVG}rect") if el.get("class")] == ["fallback"]
    flush = [el for el in root.iter(f"{SVG}line") if el.get("class") == "flush"]
    assert len(flush) == 1 and flush[0].get("data-device") == "pmem0"
    assert milestones(root) == [FIRST_LINE, "init started", "pmem0 probed"]
    labels = [el.text for el in root.iter(f"{SVG}text") if el.get("class") == "milestone-label"]
    assert labels == [f"{FIRST_LINE} + init started (0.1 s)", "pmem0 probed (0.9 s)"]  # together at one time


def test_cli_timeline_of_a_synthetic_kernel(tmp_path: Path) -> None:
    kernel, picture = tmp_path / "k", tmp_path / "run.svg"
    kernel.write_bytes(smoke_pvh_elf(CONSOLE))
    env = {"PYTHONPATH": ":".join([str(REPO), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-m", "minivmm", "run", "--kernel", str(kernel), "--timeline", str(picture)],
        capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    root = svg_of(picture.read_text())
    kinds, devices = series(root, "exits-kind"), series(root, "exits-device")
    assert set(kinds) == {"io"} and set(devices) == {"serial", "acpi-sleep"}
    # the serial exits are one per console byte, all in the run's first interval
    peak = {name: min(y for _, y in pts) for name, pts in devices.items()}  # SVG y grows downwards
    assert peak["serial"] < peak["acpi-sleep"]  # one exit per console byte against one
    assert milestones(root) == [FIRST_LINE, "init started", "pmem0 probed", "powering off"]
    assert "run-in" in {el.get("class") for el in root.iter(f"{SVG}polyline")}


def test_cli_timeline_file_that_cannot_be_written_is_refused_before_boot(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(smoke_pvh_elf(b"never printed\n"))
    env = {"PYTHONPATH": ":".join([str(REPO), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-m", "minivmm", "run", "--kernel", str(kernel), "--timeline", str(tmp_path / "no" / "dir.svg")],
        capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2 and "never printed" not in done.stdout
    assert done.stderr.strip().splitlines() == [f"minivmm: error: --timeline {tmp_path / 'no' / 'dir.svg'}: No such file or directory"]
