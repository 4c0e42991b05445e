"""Statistics as data (minivmm/stats.py): the snapshot, its JSON, the `--stats` text, and
`--stats-json` on the command line with tiny synthetic kernels on real KVM."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from support.runner import run_minivmm
from support.synthetic_kernels import make_pvh_elf, smoke_pvh_elf

from minivmm import layout
from minivmm.devices.pvpanic import PVPANIC_PANICKED
from minivmm.stats import STATS_FORMAT, ExitRecord, MachineStats, PmemDeviceStats, PmemStats, VcpuStats

SPIN = b"\xeb\xfe"  # jmp $


def sample() -> MachineStats:
    """Two vCPUs (one never ran), a traced exit, fallbacks, unclaimed accesses and a pmem device."""
    log = [ExitRecord("io", "out", layout.COM1_PORT, 1, 0x41, "serial"), ExitRecord("mmio", "read", 0xFEE0_0000, 4, 0xFFFFFFFF, "unclaimed")]
    vcpu0 = VcpuStats(Counter(io=700, mmio=41, internal_error=2), Counter(serial=650, unclaimed=3, pvpanic=1), 12.5, 0.75, 100.625, log)
    pmem = PmemStats(
        flush_requests=12, batches=10, host_fsyncs=10, service_time_total=0.03, service_time_max=0.009, fsync_time_total=0.025, fsync_time_max=0.008
    )
    return MachineStats(
        vcpus=[vcpu0, VcpuStats()],
        wall_time=14.25,
        process_start=100.0,
        fallbacks={"int3": 1, "fwait": 1},
        unclaimed={"pio": {"read": 2, "write": 1}, "mmio": {"read": 1}},
        pmem=[PmemDeviceStats("pmem0", "/tmp/a b/pmem.img", pmem)],
        stop_status=1,
        stop_reason="guest kernel panicked (pvpanic)",
        thread_errors=["pmem0 flusher: RuntimeError: boom"],
    )


EXPECTED_TEXT = """\
startup: first KVM_RUN 0.625 s after process start
vcpu0: 743 exits; in KVM_RUN 12.500 s, outside 0.750 s, wall 14.250 s
  exits io: 700
  exits mmio: 41
  exits internal_error: 2
  device serial: 650
  device unclaimed: 3
  device pvpanic: 1
vcpu1: 0 exits; in KVM_RUN 0.000 s, outside 0.000 s, wall 14.250 s
emulation fallback int3: 1
emulation fallback fwait: 1
pmem pmem0 (/tmp/a b/pmem.img): 12 flush requests, 10 host fsyncs, service mean 3.000 ms max 9.000 ms, fsync mean 2.500 ms, without fsync mean 0.500 ms
pio unclaimed reads: 2
pio unclaimed writes: 1
mmio unclaimed reads: 1
thread error: pmem0 flusher: RuntimeError: boom"""


def test_render_text_is_the_stats_report() -> None:
    assert sample().render_text() == EXPECTED_TEXT


def test_json_keys_carry_units_and_values() -> None:
    d = sample().to_dict()
    assert d["format"] == STATS_FORMAT and d["stop"] == {"status": 1, "reason": "guest kernel panicked (pvpanic)"}
    assert d["startup_s"] == 0.625 and d["wall_time_s"] == 14.25
    v0, v1 = d["vcpus"]
    assert (v0["index"], v0["exits"], v0["time_in_run_s"], v0["time_outside_s"], v0["first_run_s"]) == (0, 743, 12.5, 0.75, 0.625)
    assert list(v0["exits_by_kind"].items()) == [("io", 700), ("mmio", 41), ("internal_error", 2)]  # most common first
    assert v0["exit_log"][0] == {"kind": "io", "op": "out", "addr": 0x3F8, "size": 1, "value": 0x41, "device": "serial", "meaning": ""}
    assert (v1["exits"], v1["first_run_s"], v1["exit_log"]) == (0, None, None)
    assert d["emulation_fallbacks"] == {"int3": 1, "fwait": 1}
    assert d["unclaimed"] == {"pio": {"read": 2, "write": 1}, "mmio": {"read": 1}}
    assert d["thread_errors"] == ["pmem0 flusher: RuntimeError: boom"]
    (p,) = d["pmem"]
    assert (p["id"], p["path"], p["flush_requests"], p["host_fsyncs"]) == ("pmem0", "/tmp/a b/pmem.img", 12, 10)
    assert round(p["service_time_mean_ms"], 9) == 3.0 and round(p["time_without_fsync_mean_ms"], 9) == 0.5
    assert round(p["fsync_time_mean_ms"], 9) == 2.5 and round(p["service_time_max_ms"], 9) == 9.0


def test_round_trip_through_json() -> None:
    original = sample()
    text = json.dumps(original.to_dict())
    back = MachineStats.from_json(text)
    assert back.to_dict() == original.to_dict()
    assert back.render_text() == original.render_text() == EXPECTED_TEXT
    assert back.vcpus[0].exit_log == original.vcpus[0].exit_log and back.pmem == original.pmem
    assert back.exits_by_device()["serial"] == 650 and back.pmem_device("pmem0") == original.pmem[0]


def test_from_dict_refuses_another_document() -> None:
    d = sample().to_dict()
    d["format"] = "something-else/2"
    try:
        MachineStats.from_dict(d)
    except ValueError as exc:
        assert "minivmm-stats/1" in str(exc)
    else:
        raise AssertionError("accepted a document of another format")


def test_vcpu_stats_copy_is_independent() -> None:
    live = VcpuStats(exit_log=[])
    snap = live.copy()
    live.by_kind["io"] += 1
    live.exit_log.append(ExitRecord("io", "in", 0x3FD, 1, 0x60, "serial"))
    assert snap.exits == 0 and snap.exit_log == []


# --- the command line, with tiny kernels on real KVM, through the tests' runner ---------------
# (tests/test_runner.py: the JSON is also written when SIGTERM stops a run)


def stats_block(stderr: str) -> str:
    """--stats's lines: everything from `startup:` up to the final `minivmm: <reason>` line."""
    lines = stderr.rstrip("\n").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("startup: "))
    return "\n".join(lines[start:-1])


def test_stats_json_unwritable_is_one_line_and_nothing_boots(tmp_path: Path) -> None:
    k = tmp_path / "k"
    k.write_bytes(smoke_pvh_elf(b"booted\n"))
    for target, why in ((tmp_path / "missing-dir" / "s.json", "No such file or directory"), (tmp_path, "Is a directory")):
        run = run_minivmm(["--kernel", k, "--stats", "--stats-json", target], tmp_path / "w", timeout=60, stats=False)
        assert run.status == 2 and run.stderr == f"minivmm: error: --stats-json {target}: {why}\n", run.describe()
        assert run.stdout == ""  # the guest never printed: it never ran


def test_stats_json_matches_stats_text_after_a_guest_panic(tmp_path: Path) -> None:
    """pvpanic ends the run with status 1; the JSON says so and renders to the --stats text."""
    k = tmp_path / "k"
    port = layout.PVPANIC_PORT.to_bytes(2, "little")
    k.write_bytes(make_pvh_elf(b"\x66\xba" + port + bytes([0xB0, PVPANIC_PANICKED, 0xEE]) + SPIN))  # mov dx; mov al; out
    run = run_minivmm(["--kernel", k, "--stats"], tmp_path, timeout=60)
    stats = run.stats
    assert run.status == 1 and stats is not None, run.describe()
    assert (stats.stop_status, stats.stop_reason) == (1, "guest kernel panicked (pvpanic)")
    assert run.stderr.rstrip("\n").splitlines()[-1] == f"minivmm: {stats.stop_reason}"
    assert stats.render_text() == stats_block(run.stderr)
    (v,) = stats.vcpus
    assert v.by_device == {"pvpanic": 1} and v.by_kind == {"io": 1} and v.exit_log is None
    assert stats.startup is not None and 0 < stats.startup < run.wall and 0 < stats.wall_time < run.wall


def test_trace_puts_every_exit_in_the_json(tmp_path: Path) -> None:
    k = tmp_path / "k"
    k.write_bytes(smoke_pvh_elf(b"AB"))
    run = run_minivmm(["--kernel", k, "--trace"], tmp_path, timeout=60)
    assert run.status == 0 and run.stdout == "AB" and run.stats is not None, run.describe()
    log = run.stats.vcpus[0].exit_log
    assert log is not None and log[:2] == [
        ExitRecord("io", "out", layout.COM1_PORT, 1, ord("A"), "serial"),
        ExitRecord("io", "out", layout.COM1_PORT, 1, ord("B"), "serial"),
    ]
    assert log[-1].device == "acpi-sleep" and len(log) == sum(run.stats.vcpus[0].by_device.values())
    traced = [line.split("] ", 1)[1] for line in run.stderr.splitlines() if line.startswith("[vcpu0] ")]
    assert traced == [str(r) for r in log]  # the JSON log is the --trace log, exit for exit


def test_a_refused_run_leaves_an_existing_stats_file_alone(tmp_path: Path) -> None:
    k = tmp_path / "k"
    k.write_bytes(smoke_pvh_elf(b"booted\n"))
    target = tmp_path / "s.json"
    target.write_text("from an earlier run\n")
    run = run_minivmm(["--kernel", k, "--stats-json", target, "--pmem", tmp_path / "missing.img"], tmp_path / "w", timeout=60, stats=False)
    assert run.status == 2 and "missing.img" in run.stderr, run.describe()
    assert target.read_text() == "from an earlier run\n"
