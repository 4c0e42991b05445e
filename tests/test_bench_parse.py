"""Fast tests of bench/bench.py's parsers and summaries, fed captured text (no boots)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"
_spec = importlib.util.spec_from_file_location("minivmm_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["minivmm_bench"] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)

STATS = """\
minivmm: software KVM (kvm_pvm) detected: guest kernel code is emulated; hiding CPU features it cannot emulate with clearcpuid=
startup: first KVM_RUN 0.642 s after process start
vcpu0: 123456 exits; in KVM_RUN 120.500 s, outside 20.250 s, wall 150.000 s
  exits io: 100000
  exits mmio: 23000
  exits hlt: 456
  device serial: 99000
  device pci-config: 1000
  device virtio-pmem-pci: 23000
emulation fallback cpuid: 3
pmem None (/tmp/x/pmem.img): 210 flush requests, 205 host fsyncs, service mean 2.345 ms max 40.001 ms, fsync mean 2.100 ms, without fsync mean 0.245 ms
pio unclaimed reads: 12
mmio unclaimed writes: 2
minivmm: guest powered off (ACPI S5)
"""

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

# Captured on the kvm_pvm host (23:2x, load average ~7): stderr of a default-guest boot and of
# a pmem boot, and the pmem boot's console from the init on (lines end in \r\n).
REAL_BOOT_STDERR = """\
minivmm: software KVM (kvm_pvm) detected: guest kernel code is emulated; hiding CPU features it cannot emulate with clearcpuid=
startup: first KVM_RUN 0.811 s after process start
vcpu0: 16228 exits; in KVM_RUN 359.820 s, outside 0.463 s, wall 360.402 s
  exits io: 16227
  exits internal_error: 1
  device serial: 15792
  device pci-conf1: 431
  device acpi-sleep: 2
  device unclaimed: 1
  device pvpanic: 1
emulation fallback int3: 1
pio unclaimed reads: 1
minivmm: guest powered off (ACPI S5)
"""

REAL_PMEM_STDERR = """\
minivmm: software KVM (kvm_pvm) detected: guest kernel code is emulated; hiding CPU features it cannot emulate with clearcpuid=
startup: first KVM_RUN 1.829 s after process start
vcpu0: 18552 exits; in KVM_RUN 414.525 s, outside 0.596 s, wall 415.328 s
  exits io: 18061
  exits mmio: 487
  exits internal_error: 4
  device serial: 17192
  device pci-conf1: 865
  device pci-00:01.0-pmem0-bar0: 487
  device acpi-sleep: 2
  device unclaimed: 1
  device pvpanic: 1
emulation fallback int3: 1
emulation fallback fwait: 3
pmem pmem0 (/tmp/minivmm-bench-pmem-x/pmem.img): 412 flush requests, 412 host fsyncs, service mean 2.591 ms max 22.199 ms, fsync mean 2.466 ms, without fsync mean 0.125 ms
pio unclaimed reads: 1
minivmm: guest powered off (ACPI S5)
"""

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


def test_real_boot_stderr():
    s = bench.parse_stats(REAL_BOOT_STDERR)
    assert s["startup_s"] == 0.811 and s["vcpus"][0]["exits"] == 16228
    assert s["exits_by_kind"] == {"io": 16227, "internal_error": 1}
    assert s["exits_by_device"]["serial"] == 15792 and s["exits_by_device"]["unclaimed"] == 1
    assert s["fallbacks"] == {"int3": 1} and s["unclaimed"] == {"pio read": 1}
    assert s["stop_reason"] == "guest powered off (ACPI S5)" and s["pmem"] == []


def test_real_pmem_boot():
    stats = bench.parse_stats(REAL_PMEM_STDERR)
    assert stats["exits_by_kind"]["mmio"] == 487 and stats["fallbacks"] == {"int3": 1, "fwait": 3}
    f = bench.parse_pmem_section(REAL_PMEM_CONSOLE, stats)
    assert f["pmem_dax"] == 0 and f["flush_n"] == 200 and f["flush_mean_ms"] == 252.678325
    assert (f["pmem_flush_requests"], f["pmem_host_fsyncs"], f["pmem_service_max_ms"]) == (412, 412, 22.199)
    g = bench.parse_guest(REAL_PMEM_CONSOLE)
    assert g["hello"] and (g["steps_ok"], g["steps_failed"]) == (5, 0) and g["failures"] == []


def test_parse_stats():
    s = bench.parse_stats(STATS)
    assert s["startup_s"] == pytest.approx(0.642)
    (v,) = s["vcpus"]
    assert (v["index"], v["exits"], v["in_run_s"], v["outside_s"], v["wall_s"]) == (0, 123456, 120.5, 20.25, 150.0)
    assert s["exits_by_kind"] == {"io": 100000, "mmio": 23000, "hlt": 456}
    assert s["exits_by_device"] == {"serial": 99000, "pci-config": 1000, "virtio-pmem-pci": 23000}
    assert s["fallbacks"] == {"cpuid": 3}
    assert s["unclaimed"] == {"pio read": 12, "mmio write": 2}
    assert s["pmem"] == [
        {
            "id": "None",
            "path": "/tmp/x/pmem.img",
            "flush_requests": 210,
            "host_fsyncs": 205,
            "service_mean_ms": 2.345,
            "service_max_ms": 40.001,
            "fsync_mean_ms": 2.1,
            "overhead_mean_ms": 0.245,
        }
    ]
    assert s["stop_reason"] == "guest powered off (ACPI S5)"


def test_parse_stats_two_vcpus_are_summed():
    text = (
        "vcpu0: 10 exits; in KVM_RUN 1.000 s, outside 0.500 s, wall 2.000 s\n  exits io: 7\n  exits hlt: 3\n"
        "vcpu1: 5 exits; in KVM_RUN 1.000 s, outside 0.100 s, wall 2.000 s\n  exits io: 5\n"
    )
    s = bench.parse_stats(text)
    assert [v["exits"] for v in s["vcpus"]] == [10, 5]
    assert s["exits_by_kind"] == {"io": 12, "hlt": 3}


def test_parse_stats_without_report():
    s = bench.parse_stats("minivmm: error: the default guest is not built: run `make guest`\n")
    assert s["startup_s"] is None and s["vcpus"] == [] and s["pmem"] == []
    assert s["stop_reason"] == "error: the default guest is not built: run `make guest`"


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
    assert bench.parse_boot_section(CONSOLE, bench.parse_stats(STATS)) == {"getpid_n": 1000, "getpid_ns_per_call": 5123}
    with pytest.raises(bench.BootFailed, match="getpid"):
        bench.parse_boot_section("minivmm-test: hello pid=1\n", {})


def test_pmem_section():
    f = bench.parse_pmem_section(PMEM_CONSOLE, bench.parse_stats(STATS))
    assert f["pmem_dax"] == 1 and f["flush_n"] == 200
    assert (f["flush_mean_ms"], f["flush_min_ms"], f["flush_max_ms"]) == (2.5, 1.5, 45.0)
    assert (f["pmem_flush_requests"], f["pmem_host_fsyncs"]) == (210, 205)
    assert f["pmem_service_mean_ms"] == 2.345 and f["pmem_fsync_mean_ms"] == 2.1


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
        bench.parse_pmem_section(console, bench.parse_stats(STATS))


def test_pmem_section_needs_host_line():
    with pytest.raises(bench.BootFailed, match="pmem"):
        bench.parse_pmem_section(PMEM_CONSOLE, bench.parse_stats("startup: first KVM_RUN 1.000 s after process start\n"))


def _boot(stdout=CONSOLE, stderr=STATS, status=0, hello_at=95.0):
    return bench.Boot(status=status, spawn_to_exit=151.0, hello_at=hello_at, rusage_maxrss_kib=204800, stdout=stdout, stderr=stderr)


def test_figures():
    f = bench.figures(bench.SECTIONS["boot"], _boot())
    assert f["startup_s"] == 0.642 and f["hello_s"] == 95.0 and f["wall_s"] == 151.0
    assert f["peak_rss_mib"] == 200.0 and f["exits_total"] == 123456
    assert f["outside_pct"] == pytest.approx(100 * 20.25 / 150.0)
    assert f["getpid_ns_per_call"] == 5123 and f["exits_by_kind"]["io"] == 100000


@pytest.mark.parametrize(
    "boot, match",
    [
        (_boot(status=1, stderr=STATS.replace("guest powered off (ACPI S5)", "watchdog: no progress for 60 s")), "status 1: watchdog"),
        (_boot(hello_at=None), "never printed"),
        (_boot(stderr="minivmm: guest powered off (ACPI S5)\n"), "no --stats report"),
        (_boot(stdout=CONSOLE.replace("failed=0", "failed=1") + "minivmm-test: getpid FAILED: bad count 'x'\n"), "getpid FAILED"),
        (_boot(stdout=CONSOLE.replace("minivmm-test: done ok=3 failed=0\n", "")), "done ok=N"),
    ],
)
def test_figures_failures(boot, match):
    with pytest.raises(bench.BootFailed, match=match):
        bench.figures(bench.SECTIONS["boot"], boot)


def test_stream_watcher_marker_split_across_chunks():
    w = bench.StreamWatcher([bench.HELLO_MARKER])
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
        if section.script:
            assert section.cmdline().endswith(f" minivmm.script={section.script}") and "rdinit=" not in section.cmdline()
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
    import json

    def fake_run_vmm(args, timeout, echo=False, hello_marker=None, last_marker=None):
        if last_marker:  # the userspace section: /init + selftest
            boot = _boot(stdout=SELFTEST_STDOUT, hello_at=80.0)
            boot.last_at = 148.0
            return boot
        if "--pmem" in args:
            return _boot(stdout=CONSOLE + "minivmm-test: pmem-mount FAILED: /dev/pmem0: No such file or directory\n", status=0)
        return _boot()

    monkeypatch.setattr(bench, "run_vmm", fake_run_vmm)
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
    assert report["host"]["kvm"]


def test_exits_between_markers_counts_only_the_span():
    """Console text rebuilt from THR writes places each traced exit; only the exits between
    the end of the first marker and the start of the second count."""

    def out(ch: str) -> str:
        return f"[vcpu0] io out port=0x03f8 size=1 value={ord(ch):#x} -> serial"

    trace = [out(c) for c in "go\r\n"]
    trace += ["[vcpu0] mmio write addr=0x100000000 size=2 value=0x0 -> pci-00:01.0-pmem0-bar0"]
    trace += ["[vcpu0] io in port=0x03fd size=1 value=0x60 -> serial"]
    trace += [out(c) for c in "stop"]
    trace += ["[vcpu0] mmio write addr=0x100000000 size=2 value=0x0 -> pci-00:01.0-pmem0-bar0"]
    assert bench.exits_between("\n".join(trace), "go\r\n", "stop") == (2, {"pci-00:01.0-pmem0-bar0": 1})
    with pytest.raises(bench.BootFailed):
        bench.exits_between("\n".join(trace), "nope", "stop")


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
    fig = bench.parse_selftest_section(SELFTEST_STDOUT, {})
    assert fig["fork_exec_ms_per_cycle"] == pytest.approx(519.8)
    assert fig["sleep_1_guest_s"] == pytest.approx(1.55)
    assert fig["guest_uptime_at_done_s"] == pytest.approx(78.1)
    assert fig["selftest_failed"] == 1
    assert fig["selftest_failures"] == ["selftest pipe: FAILED run 2 of 10: wc killed by SIGSEGV (status 139); earlier runs: 77"]
    with pytest.raises(bench.BootFailed, match="never printed"):
        bench.parse_selftest_section(SELFTEST_STDOUT.replace("selftest done", "selftest dnoe"), {})
    with pytest.raises(bench.BootFailed, match="fork-exec"):
        bench.parse_selftest_section(SELFTEST_STDOUT.replace("fork-exec: ok", "fork-exec: FAILED"), {})
