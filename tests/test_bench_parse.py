"""Fast tests of bench/bench.py's parsers and summaries (no boots): the guest's console as the
guest prints it, and the VMM's statistics as the product serializes them (`MachineStats.to_json`,
read back by the runner exactly as after a real run)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from support.runner import RunResult, StreamWatcher

from minivmm import layout
from minivmm.cli import DEFAULT_CMDLINE
from minivmm.stats import ExitRecord, MachineStats, PmemDeviceStats, PmemStats, VcpuStats

_PATH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"
_spec = importlib.util.spec_from_file_location("minivmm_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["minivmm_bench"] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)

POWEROFF = "guest powered off (ACPI S5)"


def through_json(stats: MachineStats) -> MachineStats:
    """What the runner hands the benchmark: the VMM's --stats-json, read back."""
    return MachineStats.from_json(stats.to_json())


def machine_stats(
    by_kind: dict[str, int],
    by_device: dict[str, int],
    *,
    in_run: float = 120.5,
    outside: float = 20.25,
    wall: float = 150.0,
    startup: float = 0.642,
    fallbacks: dict[str, int] | None = None,
    unclaimed: dict[str, dict[str, int]] | None = None,
    pmem: list[PmemDeviceStats] | None = None,
    stop: tuple[int, str] = (0, POWEROFF),
    extra_vcpus: list[VcpuStats] | None = None,
) -> MachineStats:
    vcpu0 = VcpuStats(Counter(by_kind), Counter(by_device), in_run, outside, first_run=1000.0 + startup)
    return through_json(
        MachineStats(
            vcpus=[vcpu0, *(extra_vcpus or [])],
            wall_time=wall,
            process_start=1000.0,
            fallbacks=fallbacks or {},
            unclaimed=unclaimed or {"pio": {}, "mmio": {}},
            pmem=pmem or [],
            stop_status=stop[0],
            stop_reason=stop[1],
        )
    )


def pmem_device(ident: str, path: str, flushes: int, fsyncs: int, service_mean: float, service_max: float, fsync_mean: float) -> PmemDeviceStats:
    """A device whose flushes came in one batch per request (times in seconds)."""
    counters = PmemStats(
        flush_requests=flushes,
        batches=flushes,
        host_fsyncs=fsyncs,
        service_time_total=service_mean * flushes,
        service_time_max=service_max,
        fsync_time_total=fsync_mean * fsyncs,
        fsync_time_max=service_max,
    )
    return PmemDeviceStats(ident, path, counters)


STATS = machine_stats(
    {"io": 100000, "mmio": 23000, "hlt": 456},
    {"serial": 99000, "pci-conf1": 1000, "pci-00:01.0-pmem0-bar0": 23000},
    fallbacks={"int3": 3},
    unclaimed={"pio": {"read": 12}, "mmio": {"write": 2}},
    pmem=[pmem_device("pmem0", "/tmp/x/pmem.img", 210, 205, 0.002345, 0.040001, 0.0021)],
)

CONSOLE = """\
Linux version 6.1.192 (minivmm@minivmm) #2
Kernel command line: console=ttyS0 panic=-1 reboot=k rdinit=/sbin/minivmm-test minivmm.steps=hello,mounts,getpid minivmm.end=poweroff
Run /sbin/minivmm-test as init process\r
minivmm-test: start pid=1 steps=hello,mounts,getpid end=poweroff\r
minivmm-test: start pid=1 steps=hello,mounts,getpid end=poweroff\r
minivmm-test: hello pid=1\r
minivmm-test: hello pid=1\r
[   98.123456] minivmm-test: mounts proc=ok sys=ok dev=ok
minivmm-test: mounts proc=ok sys=ok dev=ok
minivmm-test: getpid n=1000 total_ns=5123000 ns_per_call=5123
minivmm-test: getpid n=1000 total_ns=5123000 ns_per_call=5123
minivmm-test: done ok=3 failed=0
minivmm-test: done ok=3 failed=0
minivmm-test: end action=poweroff
minivmm-test: end action=poweroff
reboot: Power down
"""

PMEM_CONSOLE = """\
minivmm-test: hello pid=1
minivmm-test: mounts proc=ok sys=ok dev=ok
nd_pmem namespace0.0: unable to guarantee persistence of writes
minivmm-test: pmem-mount dev=/dev/pmem0 dir=/mnt dax=1
minivmm-test: pmem-mount dev=/dev/pmem0 dir=/mnt dax=1
minivmm-test: flush-bench n=200 ns_per_op=2500000 min_ns=1500000 max_ns=45000000 p50_ns=2000000 p99_ns=40000000
minivmm-test: umount dir=/mnt
minivmm-test: done ok=5 failed=0
"""

# Figures of real runs on the kvm_pvm host (23:2x, load average ~7): a default-guest boot and a
# pmem boot, and the pmem boot's console from the init on (lines end in \r\n).
REAL_BOOT_STATS = machine_stats(
    {"io": 16227, "internal_error": 1},
    {"serial": 15792, "pci-conf1": 431, "acpi-sleep": 2, "unclaimed": 1, "pvpanic": 1},
    in_run=359.820,
    outside=0.463,
    wall=360.402,
    startup=0.811,
    fallbacks={"int3": 1},
    unclaimed={"pio": {"read": 1}, "mmio": {}},
)

REAL_PMEM_STATS = machine_stats(
    {"io": 18061, "mmio": 487, "internal_error": 4},
    {"serial": 17192, "pci-conf1": 865, "pci-00:01.0-pmem0-bar0": 487, "acpi-sleep": 2, "unclaimed": 1, "pvpanic": 1},
    in_run=414.525,
    outside=0.596,
    wall=415.328,
    startup=1.829,
    fallbacks={"int3": 1, "fwait": 3},
    unclaimed={"pio": {"read": 1}, "mmio": {}},
    pmem=[pmem_device("pmem0", "/tmp/minivmm-bench-pmem-x/pmem.img", 412, 412, 0.002591, 0.022199, 0.002466)],
)

REAL_PMEM_CONSOLE = (
    'Run /sbin/minivmm-test as init process\r\n'
    'minivmm-test: start pid=1 steps=hello,mounts,pmem-mount,flush-bench:200,umount end=poweroff\r\n'
    'minivmm-test: hello pid=1\r\n'
    'minivmm-test: mounts proc=ok sys=ok dev=ok\r\n'
    'EXT4-fs (pmem0): unsupported blocksize for DAX\r\n'
    '\r\n'
    'EXT4-fs (pmem0): DAX unsupported by block device.\r\n'
    'EXT4-fs (pmem0): unsupported blocksize for DAX\r\n'
    '\r\n'
    'EXT4-fs (pmem0): mounted filesystem with ordered data mode. Quota mode: disabled.\r\n'
    'minivmm-test: pmem-mount dev=/dev/pmem0 dir=/mnt dax=0 (dax mount failed: Invalid argument)\r\n'
    'minivmm-test: flush-bench n=200 ns_per_op=252678325 min_ns=131616040 max_ns=604730666 p50_ns=200000000 p99_ns=600000000\r\n'
    'EXT4-fs (pmem0): unmounting filesystem.\r\n'
    'minivmm-test: umount dir=/mnt\r\n'
    'minivmm-test: done ok=5 failed=0\r\n'
    'minivmm-test: end action=poweroff\r\n'
    'ACPI: PM: Preparing to enter system sleep state S5\r\n'
    'reboot: Power down\r\n'
)


def test_real_boot_figures():
    f = bench.figures(bench.SECTIONS["boot"], _boot(stats=REAL_BOOT_STATS))
    assert f["startup_s"] == pytest.approx(0.811) and f["exits_total"] == 16228
    assert f["exits_by_kind"] == {"io": 16227, "internal_error": 1}
    assert f["exits_by_device"]["serial"] == 15792 and f["exits_by_device"]["unclaimed"] == 1
    assert f["fallbacks"] == {"int3": 1} and f["unclaimed"] == {"pio read": 1}
    assert f["stop_reason"] == POWEROFF and f["vmm_wall_s"] == 360.402


def test_real_pmem_boot():
    assert REAL_PMEM_STATS.exits_by_kind()["mmio"] == 487 and REAL_PMEM_STATS.fallbacks == {"int3": 1, "fwait": 3}
    f = bench.parse_pmem_section(REAL_PMEM_CONSOLE, REAL_PMEM_STATS)
    assert f["pmem_dax"] == 0 and f["flush_n"] == 200 and f["flush_mean_ms"] == 252.678325
    assert (f["pmem_flush_requests"], f["pmem_host_fsyncs"]) == (412, 412)
    assert f["pmem_service_max_ms"] == pytest.approx(22.199) and f["pmem_service_mean_ms"] == pytest.approx(2.591)
    assert f["pmem_fsync_mean_ms"] == pytest.approx(2.466) and f["pmem_overhead_mean_ms"] == pytest.approx(0.125)
    g = bench.parse_guest(REAL_PMEM_CONSOLE)
    assert g["hello"] and (g["steps_ok"], g["steps_failed"]) == (5, 0) and g["failures"] == []


def test_figures_sum_two_vcpus():
    second = VcpuStats(Counter(io=5, hlt=2), Counter(serial=5), 1.0, 0.5, None)
    stats = machine_stats({"io": 7, "hlt": 3}, {"serial": 7}, extra_vcpus=[second])
    f = bench.figures(bench.SECTIONS["boot"], _boot(stats=stats))
    assert f["exits_by_kind"] == {"io": 12, "hlt": 5} and f["exits_total"] == 17
    assert f["in_run_s"] == 121.5 and f["outside_s"] == 20.75


def test_guest_lines_dedup_and_printk_prefix():
    lines = bench.guest_lines(CONSOLE)
    assert lines == [
        "start pid=1 steps=hello,mounts,getpid end=poweroff",
        "hello pid=1",
        "mounts proc=ok sys=ok dev=ok",
        "getpid n=1000 total_ns=5123000 ns_per_call=5123",
        "done ok=3 failed=0",
        "end action=poweroff",
    ]


def test_parse_guest():
    g = bench.parse_guest(CONSOLE)
    assert g["hello"] and (g["steps_ok"], g["steps_failed"]) == (3, 0)
    assert g["failures"] == [] and g["end_action"] == "poweroff"


def test_parse_guest_failures():
    g = bench.parse_guest(
        "minivmm-test: pmem-mount FAILED: /dev/pmem0: No such file or directory\n"
        "minivmm-test: pmem-mount FAILED: /dev/pmem0: No such file or directory\n"
        "minivmm-test: unknown step 'bogus'\nminivmm-test: done ok=2 failed=2\n"
    )
    assert g["failures"] == ["pmem-mount FAILED: /dev/pmem0: No such file or directory", "unknown step 'bogus'"]
    assert g["steps_failed"] == 2 and not g["hello"]


def test_boot_section():
    assert bench.parse_boot_section(CONSOLE, STATS) == {"getpid_n": 1000, "getpid_ns_per_call": 5123}
    with pytest.raises(bench.BootFailed, match="getpid"):
        bench.parse_boot_section("minivmm-test: hello pid=1\n", STATS)


def test_pmem_section():
    f = bench.parse_pmem_section(PMEM_CONSOLE, STATS)
    assert f["pmem_dax"] == 1 and f["flush_n"] == 200
    assert (f["flush_mean_ms"], f["flush_min_ms"], f["flush_max_ms"]) == (2.5, 1.5, 45.0)
    assert (f["pmem_flush_requests"], f["pmem_host_fsyncs"]) == (210, 205)
    assert f["pmem_service_mean_ms"] == pytest.approx(2.345) and f["pmem_fsync_mean_ms"] == pytest.approx(2.1)
    assert f["pmem_service_max_ms"] == pytest.approx(40.001)


@pytest.mark.parametrize(
    "console, match",
    [
        ("minivmm-test: hello pid=1\n", "pmem-mount step printed nothing"),
        ("minivmm-test: pmem-mount FAILED: /dev/pmem0: No such device or address\n", "pmem-mount step: pmem-mount FAILED"),
        ("minivmm-test: pmem-mount dev=/dev/pmem0 dir=/mnt dax=0 (dax mount failed: Invalid argument)\n", "flush-bench step printed nothing"),
        ("minivmm-test: pmem-mount dev=/dev/pmem0 dir=/mnt dax=1\nminivmm-test: flush-bench FAILED: Input/output error\n", "Input/output error"),
        ("minivmm-test: pmem-mount dev=/dev/pmem0 dir=/mnt dax=1\nminivmm-test: flush-bench n=200 ns_per_op=x\n", "cannot parse"),
    ],
)
def test_pmem_section_failures(console, match):
    with pytest.raises(bench.BootFailed, match=match):
        bench.parse_pmem_section(console, STATS)


def test_pmem_section_needs_a_pmem_device():
    with pytest.raises(bench.BootFailed, match="no pmem device"):
        bench.parse_pmem_section(PMEM_CONSOLE, machine_stats({"io": 1}, {"serial": 1}))


def _boot(stdout=CONSOLE, stats=STATS, status=0, hello_at=95.0, marker=bench.HELLO_MARKER):
    """A finished boot as the runner returns it."""
    marks = {} if hello_at is None else {marker: hello_at}
    return RunResult(["minivmm"], status, stdout, f"minivmm: {stats.stop_reason}\n" if stats else "", 151.0, stats, marks=marks, peak_rss_kib=204800)


def test_figures():
    f = bench.figures(bench.SECTIONS["boot"], _boot())
    assert f["startup_s"] == pytest.approx(0.642) and f["hello_s"] == 95.0 and f["wall_s"] == 151.0
    assert f["peak_rss_mib"] == 200.0 and f["exits_total"] == 123456
    assert f["outside_pct"] == pytest.approx(100 * 20.25 / 150.0)
    assert f["getpid_ns_per_call"] == 5123 and f["exits_by_kind"]["io"] == 100000


@pytest.mark.parametrize(
    "boot, match",
    [
        (_boot(status=1, stats=machine_stats({"io": 9}, {"serial": 9}, stop=(1, "watchdog: no exit to the VMM for 60 s"))), "status 1: watchdog"),
        (_boot(hello_at=None), "never printed"),
        (_boot(stats=None), "no --stats-json"),
        (_boot(stdout=CONSOLE.replace("failed=0", "failed=1") + "minivmm-test: getpid FAILED: bad count 'x'\n"), "getpid FAILED"),
        (_boot(stdout=CONSOLE.replace("minivmm-test: done ok=3 failed=0\n", "")), "done ok=N"),
    ],
)
def test_figures_failures(boot, match):
    with pytest.raises(bench.BootFailed, match=match):
        bench.figures(bench.SECTIONS["boot"], boot)


def test_stream_watcher_marker_split_across_chunks():
    w = StreamWatcher([bench.HELLO_MARKER])
    w.feed(b"Run /sbin/minivmm-test as init\r\nminivmm-te", 1.0)
    assert bench.HELLO_MARKER not in w.first_seen
    w.feed(b"st: hel", 2.0)
    w.feed(b"lo pid=1", 3.0)
    assert w.first_seen[bench.HELLO_MARKER] == 3.0
    w.feed(b"\r\nminivmm-test: hello pid=1\n", 4.0)
    assert w.first_seen[bench.HELLO_MARKER] == 3.0
    w.feed(b"tail", 5.0)
    w.close(6.0)
    assert w.lines == [(1.0, "Run /sbin/minivmm-test as init"), (4.0, "minivmm-test: hello pid=1"), (4.0, "minivmm-test: hello pid=1"), (6.0, "tail")]
    assert w.text.startswith("Run /sbin") and w.text.endswith("tail")


def test_summarize_runs():
    runs = [
        {"ok": True, "figures": {"wall_s": 150.0, "status": 0, "exits_by_kind": {"io": 10, "hlt": 1}, "exits_by_device": {"serial": 9}}},
        {"ok": True, "figures": {"wall_s": 160.0, "status": 0, "exits_by_kind": {"io": 14}, "exits_by_device": {"serial": 11}}},
        {"ok": True, "figures": {"wall_s": 140.0, "status": 0, "exits_by_kind": {"io": 12, "hlt": 3}, "exits_by_device": {}}},
        {"ok": False, "figures": {"wall_s": 1.0}},
    ]
    s = bench.summarize_runs(runs)
    assert s["wall_s"] == {"median": 150.0, "min": 140.0, "max": 160.0, "n": 3}
    assert s["exits.io"]["median"] == 12 and s["exits.hlt"] == {"median": 1, "min": 0, "max": 3, "n": 3}
    assert s["device.serial"]["median"] == 9


def test_table_renders_known_rows():
    runs = [{"ok": True, "figures": bench.figures(bench.SECTIONS["boot"], _boot())}]
    text = "\n".join(bench.table(bench.SECTIONS["boot"], bench.summarize_runs(runs)))
    for label in ("first KVM_RUN", "hello", "poweroff", "outside KVM_RUN", "peak RSS", "getpid", "exits during the boot (all kinds)", "  io", "serial"):
        assert label in text
    assert "0.642" in text and "5123" in text


def test_host_helpers(tmp_path):
    assert bench.cpu_model("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t: fpu\n") == "AMD EPYC"
    assert bench.cpu_model("") == "unknown"
    assert bench.kvm_kind(tmp_path) == "no kvm module loaded"
    (tmp_path / "kvm").mkdir()
    (tmp_path / "kvm_amd").mkdir()
    assert bench.kvm_kind(tmp_path).startswith("kvm_amd")
    (tmp_path / "kvm_pvm").mkdir()
    assert bench.kvm_kind(tmp_path).startswith("kvm_pvm (software KVM")


def test_args():
    a = bench.parse_args(["--quick", "--only", "pmem,boot", "--only", "pmem"])
    assert a.runs == 1 and a.sections == ["pmem", "boot"]
    assert bench.parse_args([]).sections == list(bench.SECTIONS)
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "nope"])


def test_sections_registry():
    for name, section in bench.SECTIONS.items():
        assert section.name == name
        if section.default_cmdline:
            assert section.cmdline() == DEFAULT_CMDLINE and section.vmm_args() == []
            assert section.hello_marker == "minivmm: init started" and not section.test_init
        elif section.script:
            assert section.cmdline().endswith(f" minivmm.script={section.script}{section.extra_cmdline}")
            assert "rdinit=" not in section.cmdline()
        else:
            assert "minivmm.steps=" in section.cmdline() and "rdinit=/sbin/minivmm-test" in section.cmdline()


def test_setup_pmem_formats_a_sparse_4k_ext4_image(tmp_path):
    args = bench.setup_pmem(tmp_path)
    image = tmp_path / "pmem.img"
    assert args == ["--pmem", str(image)]
    st = image.stat()
    assert st.st_size == 256 << 20 and st.st_blocks * 512 < st.st_size // 4  # sparse
    with open(image, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)  # the ext4 superblock
    assert int.from_bytes(sb[0x38:0x3A], "little") == 0xEF53
    assert 1024 << int.from_bytes(sb[0x18:0x1C], "little") == 4096  # s_log_block_size


def test_main_with_fake_boots(tmp_path, monkeypatch, capsys):
    """The whole flow without KVM: a working boot section, a failing pmem section."""
    def fake_boot_vmm(args, workdir, timeout, echo, markers, interact=None):
        if interact is not None:  # the hotplug section: the interaction's own figure
            return _boot(stdout="minivmm: init started\n", marker=markers[0]), {"hotplug_to_dev_s": 7.5}
        if len(markers) == 2:  # the userspace section: /init + selftest
            boot = _boot(stdout=SELFTEST_STDOUT, hello_at=80.0, marker=markers[0])
            boot.marks[markers[1]] = 148.0
            return boot, {}
        if "--pmem" in args:
            return _boot(stdout=CONSOLE + "minivmm-test: pmem-mount FAILED: /dev/pmem0: No such file or directory\n", status=0), {}
        return _boot(), {}

    monkeypatch.setattr(bench, "boot_vmm", fake_boot_vmm)
    out = tmp_path / "b.json"
    assert bench.main(["--runs", "2", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "[boot] default guest boot" in text and "(2/2 runs ok)" in text
    assert "[pmem] FAILED (run 1/2): a guest step failed: pmem-mount FAILED" in text
    assert "last 40 lines" in text and "skipping its remaining 1 run(s)" in text
    report = json.loads(out.read_text())
    assert report["sections"]["boot"]["ok"] and not report["sections"]["pmem"]["ok"]
    assert report["sections"]["boot"]["summary"]["getpid_ns_per_call"]["median"] == 5123
    assert "[userspace] busybox /init" in text and "/init script selftest" in text
    userspace = report["sections"]["userspace"]["summary"]
    assert userspace["last_line_s"]["median"] == 148.0 and userspace["fork_exec_ms_per_cycle"]["median"] == pytest.approx(519.8)
    assert report["sections"]["hotplug"]["summary"]["hotplug_to_dev_s"]["median"] == 7.5
    assert report["host"]["kvm"]


def test_exits_between_markers_counts_only_the_span():
    """Console text rebuilt from THR writes places each logged exit; only the exits between
    the end of the first marker and the start of the second count. The log goes through the
    product's JSON (what --trace --stats-json writes)."""

    def out(ch: str) -> ExitRecord:
        return ExitRecord("io", "out", layout.COM1_PORT, 1, ord(ch), "serial")

    bar = ExitRecord("mmio", "write", 0x1_0000_0000, 2, 0, "pci-00:01.0-pmem0-bar0")
    log = [out(c) for c in "go\r\n"] + [bar, ExitRecord("io", "in", layout.COM1_PORT + 5, 1, 0x60, "serial")]
    log += [out(c) for c in "stop"] + [bar]
    traced = machine_stats({"io": 10, "mmio": 2}, {"serial": 10, bar.device: 2})
    traced.vcpus[0].exit_log = log
    read_back = through_json(traced).vcpus[0].exit_log
    assert read_back == log
    assert bench.exits_between(read_back, "go\r\n", "stop") == (2, {"pci-00:01.0-pmem0-bar0": 1})
    with pytest.raises(bench.BootFailed):
        bench.exits_between(read_back, "nope", "stop")


DAX_TOUCH = "dax-mmap {kind} mib={mib} ns={ns} map={map} addr_2m={a} pieces={p} pmd_ready={r} faults={f} thp_fallback=-1"


def test_dax_section_needs_the_exit_log():
    console = "".join(
        f"minivmm-test: {line}\n"
        for line in (
            "pmem-mount dev=/dev/pmem0 dir=/mnt dax=1",
            DAX_TOUCH.format(kind="first-touch", mib=32, ns=1000, map="auto", a=1, p=16, r=16, f=16),
            DAX_TOUCH.format(kind="map-touch", mib=32, ns=1000, map="auto", a=1, p=16, r=16, f=16),
            "dax-mmap end mib=32 ns=2000000",
        )
    )
    with pytest.raises(bench.BootFailed, match="no exit log"):
        bench.parse_dax_section(console, STATS)


def test_dax_section_compares_2m_with_4k_faults_per_mib():
    """The 4 KiB comparison (map=pte, a smaller file) runs first; the exits counted are the
    last rewrite's (the 2 MiB-mapped file's), and the speed-ups are per MiB, for the
    allocating first touch and for a new mapping of the written file."""
    lines = [
        "pmem-mount dev=/dev/pmem0 dir=/mnt dax=1",
        DAX_TOUCH.format(kind="first-touch", mib=4, ns=12_000_000_000, map="pte", a=0, p=2, r=2, f=1025),
        DAX_TOUCH.format(kind="map-touch", mib=4, ns=10_240_000_000, map="pte", a=0, p=2, r=2, f=1024),
        "dax-mmap begin",
        "dax-mmap end mib=4 ns=9000000",
        DAX_TOUCH.format(kind="first-touch", mib=32, ns=16_000_000_000, map="auto", a=1, p=16, r=16, f=17),
        DAX_TOUCH.format(kind="map-touch", mib=32, ns=400_000_000, map="auto", a=1, p=16, r=16, f=16),
        "dax-mmap begin",
        "dax-mmap end mib=32 ns=67000000",
        "done ok=4 failed=0",
    ]
    console = "".join(f"minivmm-test: {line}\r\n" for line in lines)
    bar = ExitRecord("mmio", "write", 0x1_0000_0000, 2, 0, "pci-00:01.0-pmem0-bar0")
    log = []
    for i, ch in enumerate(console, 1):
        log.append(ExitRecord("io", "out", layout.COM1_PORT, 1, ord(ch), "serial"))
        if console[:i].endswith("dax-mmap begin\r\n"):
            log.append(bar)  # one device exit inside each rewrite
    traced = machine_stats({"io": len(console), "mmio": 2}, {"serial": len(console), bar.device: 2})
    traced.vcpus[0].exit_log = log
    fig = bench.parse_dax_section(console, through_json(traced))
    assert fig["dax_mib"] == 32 and fig["dax_first_touch_s"] == 16.0 and fig["dax_rewrite_ms"] == 67.0
    assert fig["dax_faults"] == 17 and fig["dax_pmd_ready"] == 16 and fig["dax_pieces"] == 16 and fig["dax_thp_fallback"] == -1
    assert fig["dax_map_touch_s"] == 0.4 and fig["dax_map_faults"] == 16
    assert fig["dax_exits"] == 1 and fig["dax_exits_other_devices"] == "pci-00:01.0-pmem0-bar0:1"
    assert fig["dax_pte_mib"] == 4 and fig["dax_pte_s"] == 12.0 and fig["dax_pte_faults"] == 1025
    assert fig["dax_pte_ms_per_fault"] == pytest.approx(12_000 / 1025)
    assert fig["dax_speedup"] == pytest.approx((12.0 / 4) / (16.0 / 32))  # 6x per MiB
    assert fig["dax_map_pte_s"] == 10.24 and fig["dax_map_pte_ms_per_fault"] == pytest.approx(10.0)
    assert fig["dax_map_speedup"] == pytest.approx((10.24 / 4) / (0.4 / 32))  # 204.8x per MiB


def test_dax_section_without_the_4k_comparison_has_no_speedup():
    lines = [
        "pmem-mount dev=/dev/pmem0 dir=/mnt dax=1",
        DAX_TOUCH.format(kind="first-touch", mib=2, ns=1_000_000_000, map="auto", a=1, p=1, r=1, f=1),
        DAX_TOUCH.format(kind="map-touch", mib=2, ns=50_000_000, map="auto", a=1, p=1, r=1, f=1),
        "dax-mmap begin",
        "dax-mmap end mib=2 ns=1000000",
    ]
    console = "".join(f"minivmm-test: {line}\r\n" for line in lines)
    traced = machine_stats({"io": len(console)}, {"serial": len(console)})
    traced.vcpus[0].exit_log = [ExitRecord("io", "out", layout.COM1_PORT, 1, ord(ch), "serial") for ch in console]
    fig = bench.parse_dax_section(console, through_json(traced))
    assert fig["dax_faults"] == 1 and fig["dax_exits"] == 0
    assert "dax_speedup" not in fig and "dax_map_speedup" not in fig


def test_dax_section_reports_a_failed_step():
    console = "minivmm-test: pmem-mount dev=/dev/pmem0 dir=/mnt dax=1\nminivmm-test: dax-mmap FAILED: bad argument '4:x' (MiB[:pte])\n"
    with pytest.raises(bench.BootFailed, match="bad argument"):
        bench.parse_dax_section(console, STATS)


# guest/scripts/selftest.sh on kvm_pvm (quiet): kernel-log copies and tty copies, one cut by the other.
SELFTEST_STDOUT = """\
minivmm: init started
minivmm: selftest start
minivmm: selftest fork-exec: ok n=50 ms=25990 us_per_cycle=519800 pids=50 exec_comm=cat exit_status=7
minivmm: selftest fork-exec: ok n=5minivmm: selftest sleep: ok uptime_before=60.47 uptime_after=62.02 ms=1550
0 ms=25990 us_per_cycle=519800 pids=50 exec_comm=cat exit_status=7
minivmm: selftest sleep: ok uptime_before=60.47 uptime_after=62.02 ms=1550
minivmm: selftest pipe: FAILED run 2 of 10: wc killed by SIGSEGV (status 139); earlier runs: 77
minivmm: selftest done ok=5 failed=1 uptime=78.10
minivmm: selftest done ok=5 failed=1 uptime=78.10
"""


def test_parse_selftest_section():
    fig = bench.parse_selftest_section(SELFTEST_STDOUT, STATS)
    assert fig["fork_exec_ms_per_cycle"] == pytest.approx(519.8)
    assert fig["sleep_1_guest_s"] == pytest.approx(1.55)
    assert fig["guest_uptime_at_done_s"] == pytest.approx(78.1)
    assert fig["selftest_failed"] == 1
    assert fig["selftest_failures"] == ["selftest pipe: FAILED run 2 of 10: wc killed by SIGSEGV (status 139); earlier runs: 77"]
    with pytest.raises(bench.BootFailed, match="never printed"):
        bench.parse_selftest_section(SELFTEST_STDOUT.replace("selftest done", "selftest dnoe"), STATS)
    with pytest.raises(bench.BootFailed, match="fork-exec"):
        bench.parse_selftest_section(SELFTEST_STDOUT.replace("fork-exec: ok", "fork-exec: FAILED"), STATS)


@pytest.mark.parametrize("name", bench.SMP_SECTIONS)
def test_smp_sections_are_their_one_cpu_section_with_cpus_2(tmp_path, name):
    """`NAME-2cpu` boots like NAME (command line, parser, metrics) with `--cpus 2` in front."""
    one, two = bench.SECTIONS[name], bench.SECTIONS[f"{name}-{bench.SMP_CPUS}cpu"]
    assert (two.steps, two.parse, two.metrics, two.cmdline()) == (one.steps, one.parse, one.metrics, one.cmdline())
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    args = two.setup(tmp_path / "two")
    assert args[:2] == ["--cpus", "2"]
    want = one.setup(tmp_path / "one") if one.setup else []
    assert [a.replace(str(tmp_path / "two"), str(tmp_path / "one")) for a in args[2:]] == want


def test_init_section_labels_its_first_line_once():
    """The `init` section's own label for hello_s replaces the common one (one row, not two)."""
    summary = bench.summarize_runs([{"ok": True, "figures": {"hello_s": 15.5, "wall_s": 20.0}}])
    text = "\n".join(bench.table(bench.SECTIONS["init"], summary))
    assert text.count("15.5") == 3  # median, min, max of the one row
    assert "process start -> /init's first line (default command line)" in text
    assert "spawn -> init's first line (hello)" not in text


@pytest.mark.parametrize("timeout", ["nan", "inf", "0", "-1"])
def test_bench_refuses_a_timeout_that_is_no_number_of_seconds(timeout):
    with pytest.raises(SystemExit):
        bench.parse_args(["--timeout", timeout, "--only", "init"])


def test_bench_refuses_an_unwritable_json_before_booting(tmp_path, capsys):
    assert bench.main(["--json", str(tmp_path / "missing" / "x.json"), "--only", "init"]) == 2
    assert "--json" in capsys.readouterr().err
