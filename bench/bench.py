#!/usr/bin/env python3
"""minivmm benchmark: boot the default guest N times and print medians (min/max) of what it costs.

Usage:
    python3 bench/bench.py [--runs N | --quick] [--only SECTION[,SECTION]] [--json FILE]
                           [--timeout SECONDS] [--verbose]
    make bench                                    # the same, with the project's venv

Each section boots the default guest with its own kernel command line (and files), once per
run, as a subprocess of `python -m minivmm run ... --stats-json FILE` started by the runner the
boot tests use (tests/support/runner.py), timed from just before the spawn. The VMM's own
figures come from that JSON (`minivmm.stats.MachineStats`), the guest's from its console:

  init  the default guest exactly as `minivmm run` boots it: the default command line
        (minivmm.cli.DEFAULT_CMDLINE, no --cmdline given) and the busybox /init
        (guest/init.sh): time from the spawn to /init's first console line (`minivmm: init
        started`), the figure README's "Boot time" tracks, and to its interactive shell
        (`minivmm: starting shell`); the run then ends as SIGTERM ends it (status 0): the
        shell reads the serial console, which never reaches end of file.
  boot  default guest, steps hello,mounts,getpid: time to the first KVM_RUN (the VMM's
        `startup_s`), time to the init's first line (`minivmm-test: hello`, timestamped as
        it arrives on the pipe), boot-to-poweroff wall time, exits by kind and by device, the
        share of the VMM's wall time spent outside KVM_RUN, the VMM's peak RSS (wait4
        ru_maxrss), and the guest's getpid() cost.
  userspace  the busybox /init running guest/scripts/selftest.sh (minivmm.script=selftest):
        time to /init's first line and to the selftest's last line (`minivmm: selftest done`,
        timestamped as it arrives), the cost of one fork+execve(/bin/true)+wait from the
        shell (50 cycles), the guest time of `sleep 1` and the guest's uptime at the last line.
        A selftest step that fails (e.g. the pipe one, see guest/README.md) is counted, not
        fatal; fork-exec and the last line must be there.
  hotplug  QMP object-add + device_add of a 256 MiB image while the guest waits for
        /dev/pmem1 (minivmm.script=hotplug): from device_add's reply to the guest's line saying
        the device appeared.
  pmem  a fresh, host-formatted (mkfs.ext4 -b 4096) 256 MiB sparse image as --pmem, steps
        hello,mounts,pmem-mount,flush-bench:200,umount: what flush-bench prints (mean/min/max
        of a guest 4 KiB write + fdatasync) and the host-side pmem counters of --stats-json.
  pmem-lose  the same with --pmem ...,lose-unflushed=on (power-failure simulation): each flush
        copies the pages KVM's dirty log names, then fdatasyncs; the host "fdatasync" time
        of --stats-json is then the whole copy + fdatasync.
  pmem-lose-log  the same with a flush log too, which also gives the dirty pages per flush.
  dax   a 512 MiB image with 2 MiB-aligned extents, under --trace: the guest fallocates a
        file, maps it on the DAX mount and touches it (the guest kernel zeroes the blocks as
        it maps them), then maps it again and touches it (mapping only): first with 4 KiB
        faults forced (a DAX_PTE_MIB file), then a DAX_MIB file where ext4 maps it (2 MiB
        faults): times, page faults, pieces ready for PMDs, the speed-ups per MiB; then the
        exits while it rewrites the mapping (none should be the VMM's).
  boot-2cpu, pmem-2cpu, flush1-2cpu, flush4-2cpu  the boot, pmem, flush1 and flush4 sections
        with --cpus 2 (the test init is the only program: its threads may run on both CPUs).

A section is a row of SECTIONS: a name, a command line, optional set-up (extra VMM
arguments, files in a per-boot temporary directory) and a parser for its own figures. Later
work adds rows. Figures are printed, never asserted. Exit status: 0 if every boot worked, 1 if
one failed (its output's tail is printed; the section stops, the others still run), 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the runner the boot tests use (it puts REPO on the path)

from support.runner import Minivmm, RunResult, run_minivmm, start_minivmm, tail  # noqa: E402

from minivmm import layout  # noqa: E402
from minivmm.cli import DEFAULT_CMDLINE  # noqa: E402
from minivmm.stats import ExitRecord, MachineStats, PmemDeviceStats  # noqa: E402
BASE_CMDLINE = "console=ttyS0 panic=-1 reboot=k rdinit=/sbin/minivmm-test"
HELLO_MARKER = "minivmm-test: hello"
SCRIPT_CMDLINE = DEFAULT_CMDLINE  # /init with minivmm.script=NAME
INIT_MARKER = "minivmm: init started"  # guest/init.sh's first console line
TAIL_LINES = 40
DEFAULT_RUNS = 3
DEFAULT_TIMEOUT = 1200.0  # seconds per boot; a boot takes ~150 s on kvm_pvm, more when the host is busy
NOISE_NOTE = (
    "note: this machine is shared with other work (2 cores) and noisy: figures move from run to run "
    "and with the load average; compare medians and read min/max as the spread."
)


class BootFailed(Exception):
    """A boot (or its set-up) did not produce the figures it should have."""


# -- parsers (pure functions of a run's console and statistics; tests/test_bench_parse.py) -----

_GUEST_RE = re.compile(r"minivmm-test: (?P<rest>.*?)\s*$")
_KV_RE = re.compile(r"(\w+)=(\S+)")


def guest_lines(text: str) -> list[str]:
    """The test init's lines (after "minivmm-test: "), in order, without duplicates.

    Each line reaches the console twice (the kernel log copy, maybe with a printk timestamp,
    and the init's own write); the first of two identical neighbours is kept.
    """
    seen: list[str] = []
    for raw in text.splitlines():
        m = _GUEST_RE.search(raw.replace("\r", ""))
        if m and m["rest"] and not (seen and seen[-1] == m["rest"]):
            seen.append(m["rest"])
    return seen


def _fields(rest: str) -> dict[str, str]:
    return dict(_KV_RE.findall(rest))


def _int_fields(rest: str, *names: str) -> dict[str, int]:
    f = _fields(rest)
    try:
        return {name: int(f[name]) for name in names}
    except (KeyError, ValueError):
        raise BootFailed(f"cannot parse the guest line {rest!r}") from None


def parse_guest(text: str) -> dict:
    """What the test init reported on the console: {"hello": bool, "steps_ok", "steps_failed",
    "failures": [lines containing FAILED or "unknown step"], "end_action", "lines"}."""
    lines = guest_lines(text)
    out: dict = {"hello": False, "steps_ok": None, "steps_failed": None, "failures": [], "end_action": None, "lines": lines}
    for rest in lines:
        word = rest.split(" ", 1)[0]
        if word == "hello":
            out["hello"] = True
        elif word == "done":
            f = _fields(rest)
            if "ok" in f and "failed" in f:
                out["steps_ok"], out["steps_failed"] = int(f["ok"]), int(f["failed"])
        elif word == "end" and rest.startswith("end action="):
            out["end_action"] = _fields(rest).get("action")
        if (" FAILED" in rest or rest.startswith("unknown step")) and rest not in out["failures"]:
            out["failures"].append(rest)
    return out


def _guest_step(lines: list[str], step: str) -> str | None:
    """The first line of a step (e.g. "getpid n=1000 ..."), None if it never printed one."""
    for rest in lines:
        if rest.split(" ", 1)[0] == step:
            return rest
    return None


def parse_boot_section(stdout: str, stats: MachineStats) -> dict:
    """Figures of the `boot` section: the guest's getpid() cost."""
    line = _guest_step(guest_lines(stdout), "getpid")
    if line is None:
        raise BootFailed("the getpid step printed nothing")
    if "FAILED" in line:
        raise BootFailed(f"getpid step: {line}")
    f = _int_fields(line, "n", "total_ns", "ns_per_call")
    return {"getpid_n": f["n"], "getpid_ns_per_call": f["ns_per_call"]}


def parse_pmem_section(stdout: str, stats: MachineStats) -> dict:
    """Figures of the `pmem` section: the guest's flush-bench line (4 KiB pwrite + fdatasync:
    mean, min, max), whether the mount used DAX, and the host's pmem counters."""
    lines = guest_lines(stdout)
    out: dict = {}
    mount = _guest_step(lines, "pmem-mount")
    if mount is None:
        raise BootFailed("the pmem-mount step printed nothing (is /dev/pmem0 there?)")
    if "FAILED" in mount:
        raise BootFailed(f"pmem-mount step: {mount}")
    out["pmem_dax"] = int(_fields(mount).get("dax", "-1"))
    bench = _guest_step(lines, "flush-bench")
    if bench is None:
        raise BootFailed("the flush-bench step printed nothing")
    if "FAILED" in bench:
        raise BootFailed(f"flush-bench step: {bench}")
    f = _int_fields(bench, "n", "ns_per_op", "min_ns", "max_ns", "p50_ns", "p99_ns")
    out.update(
        flush_n=f["n"],
        flush_mean_ms=f["ns_per_op"] / 1e6,
        flush_min_ms=f["min_ns"] / 1e6,
        flush_max_ms=f["max_ns"] / 1e6,
        flush_p50_ms=f["p50_ns"] / 1e6,
        flush_p99_ms=f["p99_ns"] / 1e6,
    )
    host = first_pmem(stats).to_dict()
    out.update(
        pmem_flush_requests=host["flush_requests"],
        pmem_host_fsyncs=host["host_fsyncs"],
        pmem_service_mean_ms=host["service_time_mean_ms"],
        pmem_service_max_ms=host["service_time_max_ms"],
        pmem_fsync_mean_ms=host["fsync_time_mean_ms"],
        pmem_overhead_mean_ms=host["time_without_fsync_mean_ms"],
    )
    return out


_SELFTEST_STEP_RE = re.compile(r"^selftest (?P<step>[\w-]+): (?P<status>ok|FAILED)\b ?(?P<rest>.*)$")
_SELFTEST_DONE_RE = re.compile(r"^selftest done ok=(?P<ok>\d+) failed=(?P<failed>\d+) uptime=(?P<uptime>[\d.]+)$")


def minivmm_messages(text: str) -> list[str]:
    """Each console line's last `minivmm: ` message, prefix removed. The selftest writes each line
    to the kernel log (printed whole, at once) and to the tty (drained later), so a kernel-log
    record can cut into a tty line; the record always ends its console line."""
    found = []
    for raw in text.splitlines():
        i = raw.rfind("minivmm: ")
        if i >= 0:
            found.append(raw[i + len("minivmm: ") :].rstrip("\r"))
    return found


def parse_selftest_section(stdout: str, stats: MachineStats) -> dict:
    """Figures of the `userspace` section from guest/scripts/selftest.sh's lines (the first copy
    of each): fork+exec+wait ms per cycle, `sleep 1` in guest seconds, uptime at `done`, and how
    many steps failed (counted, not fatal, except fork-exec and the `done` line)."""
    steps: dict[str, re.Match] = {}
    done = None
    for text in minivmm_messages(stdout):
        if (m := _SELFTEST_STEP_RE.match(text)) and m["step"] not in steps:
            steps[m["step"]] = m
        elif done is None and (d := _SELFTEST_DONE_RE.match(text)):
            done = d
    if done is None:
        raise BootFailed("the selftest never printed `minivmm: selftest done ...`")
    fe = steps.get("fork-exec")
    if fe is None or fe["status"] != "ok":
        raise BootFailed(f"selftest fork-exec step: {fe[0] if fe else 'no line'}")
    f = _fields(fe["rest"])
    out = {
        "fork_exec_ms_per_cycle": int(f["ms"]) / int(f["n"]),
        "guest_uptime_at_done_s": float(done["uptime"]),
        "selftest_failed": int(done["failed"]),
    }
    sl = steps.get("sleep")
    if sl is not None and sl["status"] == "ok":
        out["sleep_1_guest_s"] = int(_fields(sl["rest"])["ms"]) / 1000
    failed = [m[0] for m in steps.values() if m["status"] != "ok"]
    if failed:
        out["selftest_failures"] = failed  # a list: kept in the JSON, not summarized
    return out


# -- sections -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str = ""
    fmt: str = "{:.1f}"


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    steps: str
    parse: Callable[[str, MachineStats], dict]  # (console, statistics) -> figures; raises BootFailed
    metrics: tuple[Metric, ...] = ()  # the section's own rows of the table
    setup: Callable[[Path], list[str]] | None = None  # (temp dir) -> extra `minivmm run` arguments
    end: str = "poweroff"
    script: str | None = None  # boot /init with minivmm.script=SCRIPT instead of the test init (steps unused)
    hello_marker: str = HELLO_MARKER  # the init's first line ("hello_s")
    last_marker: str | None = None  # the init's last line of interest ("last_line_s")
    # Talks to the running VMM (e.g. over QMP) while the runner streams its output; returns
    # figures of its own. Raises BootFailed.
    interact: Callable[[Minivmm, Path], dict] | None = None
    extra_cmdline: str = ""
    # Boot as a user does: no --cmdline (the VMM's DEFAULT_CMDLINE), /init without a script.
    default_cmdline: bool = False

    @property
    def test_init(self) -> bool:
        """Whether the section boots the test init (rdinit=/sbin/minivmm-test) and its steps."""
        return not (self.script or self.default_cmdline)

    def cmdline(self) -> str:
        if self.default_cmdline:
            return DEFAULT_CMDLINE
        if self.script:
            return f"{SCRIPT_CMDLINE} minivmm.script={self.script}{self.extra_cmdline}"
        return f"{BASE_CMDLINE} minivmm.steps={self.steps} minivmm.end={self.end}"

    def markers(self) -> list[str]:
        """The console lines whose arrival times are figures: the first one, and the last if any."""
        return [self.hello_marker, *([self.last_marker] if self.last_marker else [])]

    def vmm_args(self) -> list[str]:
        """The `--cmdline` argument, none for a default-command-line section."""
        return [] if self.default_cmdline else ["--cmdline", self.cmdline()]

    def describe(self) -> str:
        if self.default_cmdline:
            return f"default command line {DEFAULT_CMDLINE!r}, /init"
        return f"/init script {self.script}" if self.script else f"steps {self.steps} -> {self.end}"


PMEM_SIZE = 256 << 20
FLUSH_N = 200  # flush-bench operations per pmem boot


# mke2fs.conf gives a filesystem under 512 MiB ("small") 1 KiB blocks, and ext4 refuses DAX
# unless the block size is the page size ("unsupported blocksize for DAX"): the guest would
# fall back to the page cache and the section would not measure the DAX path.
# stripe_width=512 blocks (2 MiB) makes ext4's allocator (mballoc, s_stripe) place files'
# extents 2 MiB aligned, so a DAX mapping can take 2 MiB (PMD) faults (README "DAX with
# 2 MiB pages"); the Makefile's `make run` image uses the same options.
MKFS_EXT4_ARGS = ("-q", "-F", "-b", "4096", "-E", "stripe_width=512")


def mkfs_ext4() -> str:
    for candidate in (shutil.which("mkfs.ext4"), "/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BootFailed("mkfs.ext4 not found (Debian: apt-get install e2fsprogs)")


def setup_pmem(workdir: Path) -> list[str]:
    """A fresh sparse 256 MiB image, formatted ext4 (4 KiB blocks, for DAX) on the host."""
    image = workdir / "pmem.img"
    with open(image, "wb") as f:
        f.truncate(PMEM_SIZE)
    proc = subprocess.run([mkfs_ext4(), *MKFS_EXT4_ARGS, str(image)], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BootFailed(f"mkfs.ext4 failed (status {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return ["--pmem", str(image)]


FLUSH_LOG_NAME = "flush.log"


def setup_pmem_lose(workdir: Path) -> list[str]:
    """The `pmem` image as a lose-unflushed device (power-failure simulation, no flush log)."""
    path = setup_pmem(workdir)[1]
    return ["--pmem", f"{path},lose-unflushed=on"]


def setup_pmem_lose_log(workdir: Path) -> list[str]:
    """The `pmem` image as a lose-unflushed device with a flush log next to it."""
    path = setup_pmem(workdir)[1]
    return ["--pmem", f"{path},lose-unflushed=on,flush-log={workdir / FLUSH_LOG_NAME}"]


def parse_pmem_lose_log_section(stdout: str, stats: MachineStats) -> dict:
    """The `pmem` figures, plus the flush log's: pages the host copied per flush (mean, max)."""
    from minivmm.flushlog import read_log

    out = parse_pmem_section(stdout, stats)
    log = read_log(str(Path(first_pmem(stats).path).with_name(FLUSH_LOG_NAME)))
    if log.warning or not log.records:
        raise BootFailed(f"flush log: {log.warning or 'no record'}")
    pages = [len(r.offsets) for r in log.records]
    out.update(pages_per_flush_mean=statistics.mean(pages), pages_per_flush_max=max(pages), log_flushes=len(pages))
    return out


def first_pmem(stats: MachineStats) -> PmemDeviceStats:
    """The first virtio-pmem device's statistics (the sections use one device)."""
    if not stats.pmem:
        raise BootFailed("no pmem device in the --stats-json statistics")
    return stats.pmem[0]


def parse_flush_threads_section(stdout: str, stats: MachineStats) -> dict:
    """Figures of the `flushN` sections: guest fdatasyncs from T threads at once, and how many
    flush requests and host fdatasyncs they became (group commit merges concurrent ones)."""
    line = _guest_step(guest_lines(stdout), "flush-threads")
    if line is None or "FAILED" in line:
        raise BootFailed(f"flush-threads step: {line or 'printed nothing'}")
    f = _int_fields(line, "threads", "n", "wall_ns")
    host = first_pmem(stats).counters
    guest_flushes = f["threads"] * f["n"]
    return {
        "guest_fdatasyncs": guest_flushes,
        "flush_requests_per_guest_flush": host.flush_requests / guest_flushes,
        "host_fsyncs_per_guest_flush": host.host_fsyncs / guest_flushes,
        "host_fsyncs_per_flush_request": host.host_fsyncs / host.flush_requests,
        "flush_threads_ops_per_s": guest_flushes / (f["wall_ns"] / 1e9),
    }


def exits_between(log: list[ExitRecord], begin: str, end: str) -> tuple[int, dict[str, int]]:
    """(all exits, {device: exits} for devices other than the serial console) after the guest
    finished printing `begin` and before it printed the first character of `end`, from a traced
    run's exit log (--trace puts it in --stats-json): the console text is rebuilt from the writes
    to COM1's THR, which places every exit."""
    text: list[str] = []
    thr_exit: list[int] = []  # for each console character, the index of its THR write exit
    for i, r in enumerate(log):
        if r.kind == "io" and r.op == "out" and r.addr == layout.COM1_PORT:
            text.append(chr(r.value))
            thr_exit.append(i)
    console = "".join(text)
    start = console.rfind(begin)
    stop = console.find(end, start + len(begin)) if start >= 0 else -1
    if start < 0 or stop < 0:
        raise BootFailed(f"the exit log has no {begin!r} ... {end!r} in the console output")
    inside = log[thr_exit[start + len(begin) - 1] + 1 : thr_exit[stop]]
    return len(inside), dict(Counter(r.device for r in inside if r.device != "serial"))


def _dax_touches(lines: list[str]) -> dict[tuple[str, str], dict[str, int]]:
    """The dax-mmap steps' touch lines by (pass, mapping): pass "first-touch" (fallocated
    blocks, zeroed by the guest kernel as they are mapped) or "map-touch" (a new mapping of the
    now written blocks); mapping "auto" (where ext4 puts it, 2 MiB aligned) or "pte" (4 KiB
    faults forced). Each is {mib, ns, pieces, pmd_ready, faults, thp_fallback}."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for rest in lines:
        if "dax-mmap FAILED" in rest:
            raise BootFailed(rest)
        kind = rest.split(" ", 2)[1] if rest.startswith("dax-mmap ") else ""
        if kind in ("first-touch", "map-touch"):
            f = _int_fields(rest, "mib", "ns", "pieces", "pmd_ready", "faults", "thp_fallback")
            out[(kind, _fields(rest).get("map", "auto"))] = f
    return out


def _dax_pte_comparison(touch: dict[tuple[str, str], dict[str, int]]) -> dict:
    """The 4 KiB-fault runs' figures and the speed-ups per MiB (4 KiB time / 2 MiB time)."""
    out: dict = {}
    for kind, prefix in (("first-touch", "dax"), ("map-touch", "dax_map")):
        pte, pmd = touch.get((kind, "pte")), touch.get((kind, "auto"))
        if pte is None or pmd is None:
            continue
        out[f"{prefix}_pte_s"] = pte["ns"] / 1e9
        out[f"{prefix}_pte_faults"] = pte["faults"]
        out[f"{prefix}_pte_ms_per_fault"] = pte["ns"] / 1e6 / max(pte["faults"], 1)
        out[f"{prefix}_speedup"] = (pte["ns"] / pte["mib"]) / (pmd["ns"] / pmd["mib"])
    if ("first-touch", "pte") in touch:
        out["dax_pte_mib"] = touch[("first-touch", "pte")]["mib"]
    return out


def parse_dax_section(stdout: str, stats: MachineStats) -> dict:
    """Figures of the `dax` section: the first touch of a DAX mapping (of fallocated blocks,
    then of written ones) with 2 MiB (PMD) faults against the same with 4 KiB faults forced
    (per MiB), and the exits while the guest rewrites the mapping (the last dax-mmap step's)."""
    lines = guest_lines(stdout)
    mount = _guest_step(lines, "pmem-mount")
    if mount is None or _fields(mount).get("dax") != "1":
        raise BootFailed(f"the pmem mount did not use DAX: {mount}")
    touch = _dax_touches(lines)
    end = next((_int_fields(rest, "mib", "ns") for rest in reversed(lines) if rest.startswith("dax-mmap end")), None)
    if ("first-touch", "auto") not in touch or ("map-touch", "auto") not in touch or end is None:
        raise BootFailed("the dax-mmap step did not finish")
    log = stats.vcpus[0].exit_log if stats.vcpus else None
    if log is None:
        raise BootFailed("no exit log in --stats-json (the dax section runs with --trace)")
    total, others = exits_between(log, "minivmm-test: dax-mmap begin\r\n", "minivmm-test: dax-mmap end")
    first, remap = touch[("first-touch", "auto")], touch[("map-touch", "auto")]
    return {
        "dax_mib": end["mib"],
        "dax_first_touch_s": first["ns"] / 1e9,
        "dax_faults": first["faults"],
        "dax_pmd_ready": first["pmd_ready"],
        "dax_pieces": first["pieces"],
        "dax_thp_fallback": first["thp_fallback"],
        "dax_map_touch_s": remap["ns"] / 1e9,
        "dax_map_faults": remap["faults"],
        "dax_rewrite_ms": end["ns"] / 1e6,
        "dax_exits": total,
        "dax_exits_not_console": sum(others.values()),
        "dax_exits_other_devices": " ".join(f"{dev}:{n}" for dev, n in sorted(others.items())),  # JSON only
        **_dax_pte_comparison(touch),
    }


FLUSH_THREADS_OPS = 48  # guest fdatasyncs per flushN boot, split over the threads
DAX_MIB = int(os.environ.get("MINIVMM_BENCH_DAX_MIB", "32"))  # 256 works (about 16 s of first touch with PMD faults)
# The 4 KiB comparison maps a smaller file: each 4 KiB fault costs 10-70 ms here.
DAX_PTE_MIB = int(os.environ.get("MINIVMM_BENCH_DAX_PTE_MIB", "4"))


def setup_dax(workdir: Path) -> list[str]:
    """A 512 MiB image (MKFS_EXT4_ARGS: 2 MiB-aligned extents), and --trace."""
    image = workdir / "dax.img"
    with open(image, "wb") as f:
        f.truncate(2 * PMEM_SIZE)
    proc = subprocess.run([mkfs_ext4(), *MKFS_EXT4_ARGS, str(image)], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BootFailed(f"mkfs.ext4 failed (status {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return ["--pmem", str(image), "--trace"]


COMMON_METRICS = (
    Metric("startup_s", "process start -> first KVM_RUN", "s", "{:.3f}"),
    Metric("hello_s", "spawn -> init's first line (hello)", "s"),
    Metric("last_line_s", "spawn -> init script's last line", "s"),
    Metric("wall_s", "spawn -> exit (boot to poweroff)", "s"),
    Metric("outside_pct", "time outside KVM_RUN / VMM wall", "%", "{:.2f}"),
    Metric("in_run_s", "time in KVM_RUN", "s"),
    Metric("outside_s", "time outside KVM_RUN", "s"),
    Metric("peak_rss_mib", "VMM peak RSS (ru_maxrss)", "MiB"),
)

HOTPLUG_SIZE = 256 << 20
HOTPLUG_WAITING = "minivmm: hotplug waiting for /dev/pmem1"
HOTPLUG_APPEARED = "minivmm: hotplug /dev/pmem1 appeared"
HOTPLUG_TOKEN = "bench"


def setup_hotplug(workdir: Path) -> list[str]:
    """A cold-plugged pmem0, the image to hot-add (ext4 with a token file), a QMP socket."""
    content = workdir / "hot.d"
    content.mkdir()
    (content / "token").write_text(f"{HOTPLUG_TOKEN}\n")
    image = workdir / "hot.img"
    with open(image, "wb") as f:
        f.truncate(HOTPLUG_SIZE)
    proc = subprocess.run([mkfs_ext4(), *MKFS_EXT4_ARGS, "-d", str(content), str(image)], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BootFailed(f"mkfs.ext4 failed (status {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return [*setup_pmem(workdir), "--qmp", str(workdir / "qmp.sock")]


SHELL_MARKER = "minivmm: starting shell"


def interact_init(vmm: Minivmm, workdir: Path) -> dict:
    """End the `init` section's run once /init starts its shell (which waits on the console)."""
    wait_console(vmm, SHELL_MARKER, DEFAULT_TIMEOUT)
    vmm.signal(signal.SIGTERM)
    return {}


def wait_console(vmm: Minivmm, text: str, timeout: float) -> float:
    """Poll the streamed console for `text`; the runner's clock when it was first seen."""
    deadline = time.monotonic() + timeout
    while text not in vmm.out.text:
        if vmm.proc.poll() is not None or time.monotonic() > deadline:
            raise BootFailed(f"the guest never printed {text!r}")
        time.sleep(0.01)
    return vmm.elapsed()


def interact_hotplug(vmm: Minivmm, workdir: Path) -> dict:
    """QMP object-add + device_add of a 256 MiB image once the guest waits for /dev/pmem1;
    the time from device_add's reply to the guest's line saying the device appeared (the
    guest checks once a second), then system_powerdown."""
    from qemu.qmp import QMPClient

    async def drive() -> dict:
        wait_console(vmm, HOTPLUG_WAITING, DEFAULT_TIMEOUT)
        client = QMPClient("bench")
        await client.connect(str(workdir / "qmp.sock"))
        await client.execute("object-add", {"qom-type": "memory-backend-file", "id": "hot", "share": True,
                                            "mem-path": str(workdir / "hot.img"), "size": HOTPLUG_SIZE})  # fmt: skip
        await client.execute("device_add", {"driver": "virtio-pmem-pci", "id": "nvhot", "memdev": "hot"})
        added = vmm.elapsed()
        seen = await asyncio.to_thread(wait_console, vmm, HOTPLUG_APPEARED, DEFAULT_TIMEOUT)
        await asyncio.to_thread(wait_console, vmm, "minivmm: hotplug answer written", DEFAULT_TIMEOUT)
        await client.execute("system_powerdown")
        await client.disconnect()
        return {"hotplug_to_dev_s": seen - added}

    return asyncio.run(drive())



PMEM_METRICS: tuple[Metric, ...] = (
    Metric("flush_p50_ms", f"guest 4 KiB write+fdatasync: median of {FLUSH_N}", "ms", "{:.3f}"),
    Metric("flush_p99_ms", f"guest 4 KiB write+fdatasync: p99 of {FLUSH_N}", "ms", "{:.3f}"),
    Metric("flush_mean_ms", f"guest 4 KiB write+fdatasync: mean of {FLUSH_N}", "ms", "{:.3f}"),
    Metric("flush_min_ms", "guest 4 KiB write+fdatasync: min", "ms", "{:.3f}"),
    Metric("flush_max_ms", "guest 4 KiB write+fdatasync: max", "ms", "{:.3f}"),
    Metric("pmem_dax", "ext4 mounted with DAX (1 yes, 0 no)", "", "{:.0f}"),
    Metric("pmem_flush_requests", "host: virtio-pmem flush requests", "", "{:.0f}"),
    Metric("pmem_host_fsyncs", "host: fdatasyncs of the image", "", "{:.0f}"),
    Metric("pmem_service_mean_ms", "host: flush service time mean", "ms", "{:.3f}"),
    Metric("pmem_service_max_ms", "host: flush service time max", "ms", "{:.3f}"),
    Metric("pmem_fsync_mean_ms", "host: fdatasync mean", "ms", "{:.3f}"),
    Metric("pmem_overhead_mean_ms", "host: flush service without the fdatasync, mean", "ms", "{:.3f}"),
)

SECTIONS: dict[str, Section] = {
    s.name: s
    for s in (
        Section(
            "init",
            "the default guest as `minivmm run` boots it: default command line, busybox /init",
            "",
            lambda stdout, stats: {},
            (
                Metric("hello_s", "process start -> /init's first line (default command line)", "s"),
                Metric("last_line_s", "process start -> /init starts its shell", "s"),
            ),
            default_cmdline=True,
            hello_marker=INIT_MARKER,
            last_marker=SHELL_MARKER,
            interact=interact_init,
        ),
        Section(
            "boot",
            "default guest boot",
            "hello,mounts,getpid",
            parse_boot_section,
            (Metric("getpid_ns_per_call", "guest getpid() (1000 calls)", "ns/call", "{:.0f}"),),
        ),
        Section(
            "userspace",
            "busybox /init + guest/scripts/selftest.sh (minivmm.script=selftest)",
            "",
            parse_selftest_section,
            (
                Metric("fork_exec_ms_per_cycle", "guest fork+execve(/bin/true)+wait from ash (50 cycles)", "ms/cycle"),
                Metric("sleep_1_guest_s", "guest `sleep 1` incl. starting it (/proc/uptime)", "s", "{:.2f}"),
                Metric("guest_uptime_at_done_s", "guest uptime at the selftest's last line", "s"),
                Metric("selftest_failed", "selftest steps FAILED (see the JSON)", "", "{:.0f}"),
            ),
            script="selftest",
            hello_marker=INIT_MARKER,
            last_marker="minivmm: selftest done",
        ),
        Section(
            "pmem",
            "virtio-pmem: 256 MiB ext4 (4 KiB blocks) image, 4 KiB write + fdatasync in the guest",
            f"hello,mounts,pmem-mount,flush-bench:{FLUSH_N},umount",
            parse_pmem_section,
            PMEM_METRICS,
            setup=setup_pmem,
        ),
        *(
            Section(
                name,
                f"virtio-pmem lose-unflushed=on{extra}: the `pmem` workload (dirty-log copy + fdatasync per flush)",
                f"hello,mounts,pmem-mount,flush-bench:{FLUSH_N},umount",
                parse,
                PMEM_METRICS + more,
                setup=setup,
            )
            for name, extra, parse, more, setup in (
                ("pmem-lose", "", parse_pmem_section, (), setup_pmem_lose),
                (
                    "pmem-lose-log", ",flush-log=FILE", parse_pmem_lose_log_section,
                    (
                        Metric("pages_per_flush_mean", "host: dirty pages copied per flush, mean (flush log)", "", "{:.2f}"),
                        Metric("pages_per_flush_max", "host: dirty pages copied per flush, max", "", "{:.0f}"),
                        Metric("log_flushes", "host: flushes in the log", "", "{:.0f}"),
                    ),
                    setup_pmem_lose_log,
                ),
            )  # fmt: skip
        ),
        *(
            Section(
                f"flush{threads}",
                f"virtio-pmem: {FLUSH_THREADS_OPS} guest fdatasyncs from {threads} thread(s) at once",
                f"hello,mounts,pmem-mount,flush-threads:{threads}x{FLUSH_THREADS_OPS // threads},umount",
                parse_flush_threads_section,
                (
                    Metric("flush_requests_per_guest_flush", "flush requests per guest fdatasync", "", "{:.2f}"),
                    Metric("host_fsyncs_per_guest_flush", "host fdatasyncs per guest fdatasync", "", "{:.2f}"),
                    Metric("host_fsyncs_per_flush_request", "host fdatasyncs per flush request", "", "{:.2f}"),
                    Metric("flush_threads_ops_per_s", "guest fdatasyncs per second", "1/s", "{:.2f}"),
                ),
                setup=setup_pmem,
            )
            for threads in (1, 4)
        ),
        Section(
            "dax",
            f"virtio-pmem: first touch of DAX mmaps (fallocated, then written), {DAX_PTE_MIB} MiB with 4 KiB faults "
            f"forced, then {DAX_MIB} MiB with 2 MiB faults, and the exits while the guest rewrites it, under --trace",
            f"hello,mounts,pmem-mount,dax-mmap:{DAX_PTE_MIB}:pte,dax-mmap:{DAX_MIB},umount",
            parse_dax_section,
            (
                Metric("dax_exits", f"exits while rewriting {DAX_MIB} MiB through the DAX mapping", "", "{:.0f}"),
                Metric("dax_exits_not_console", "  of which not for the console", "", "{:.0f}"),
                Metric("dax_rewrite_ms", f"guest: rewrite of {DAX_MIB} MiB (user-mode stores)", "ms", "{:.1f}"),
                Metric("dax_first_touch_s", f"guest: first touch of {DAX_MIB} MiB fallocated (faults + zeroing)", "s", "{:.2f}"),
                Metric("dax_faults", f"  page faults it took ({DAX_MIB * 256} with 4 KiB faults)", "", "{:.0f}"),
                Metric("dax_pmd_ready", "  2 MiB pieces of the file with 2 MiB-aligned extents", "", "{:.0f}"),
                Metric("dax_pte_s", f"  the same for {DAX_PTE_MIB} MiB, 4 KiB faults forced", "s", "{:.2f}"),
                Metric("dax_pte_ms_per_fault", "    per 4 KiB fault", "ms", "{:.1f}"),
                Metric("dax_speedup", "  per MiB: 4 KiB faults / 2 MiB faults", "x", "{:.1f}"),
                Metric("dax_map_touch_s", f"guest: first touch of a new mapping of the written {DAX_MIB} MiB", "s", "{:.2f}"),
                Metric("dax_map_faults", "  page faults it took", "", "{:.0f}"),
                Metric("dax_map_pte_s", f"  the same for {DAX_PTE_MIB} MiB, 4 KiB faults forced", "s", "{:.2f}"),
                Metric("dax_map_pte_ms_per_fault", "    per 4 KiB fault", "ms", "{:.1f}"),
                Metric("dax_map_speedup", "  per MiB: 4 KiB faults / 2 MiB faults", "x", "{:.0f}"),
            ),
            setup=setup_dax,
        ),
        Section(
            "hotplug",
            "virtio-pmem hot-add over QMP: a 256 MiB image, object-add + device_add while the guest waits",
            "",
            lambda stdout, stats: {},
            (Metric("hotplug_to_dev_s", "device_add reply to the guest seeing /dev/pmem1 (polled once a second)", "s", "{:.1f}"),),
            setup=setup_hotplug,
            script="hotplug",
            extra_cmdline=" minivmm.hotplug=pmem1",
            hello_marker=INIT_MARKER,
            interact=interact_hotplug,
        ),
    )
}


# -- SMP: the same sections with --cpus 2 ------------------------------------------------------

SMP_CPUS = 2
SMP_SECTIONS = ("boot", "pmem", "flush1", "flush4")  # boot time; flush latency; fsyncs per flush


def with_cpus(setup: Callable[[Path], list[str]] | None, cpus: int) -> Callable[[Path], list[str]]:
    """`setup` with `--cpus N` in front of its arguments."""
    return lambda workdir: ["--cpus", str(cpus), *(setup(workdir) if setup else [])]


SECTIONS.update(
    {
        f"{name}-{SMP_CPUS}cpu": replace(
            SECTIONS[name], name=f"{name}-{SMP_CPUS}cpu", title=f"{SECTIONS[name].title}, --cpus {SMP_CPUS}",
            setup=with_cpus(SECTIONS[name].setup, SMP_CPUS),
        )  # fmt: skip
        for name in SMP_SECTIONS
    }
)


# -- one boot -------------------------------------------------------------------------------


def boot_vmm(
    args: list[str], workdir: Path, timeout: float, echo: bool, markers: list[str], interact: Callable[[Minivmm, Path], dict] | None = None
) -> tuple[RunResult, dict]:
    """One `python -m minivmm run ARGS --stats-json ...` through the runner; outputs in workdir.
    With `interact`, it runs while the runner streams the output (on a thread); its figures
    come back beside the run's. A failed interaction kills the VMM."""
    if interact is None:
        return run_minivmm(args, workdir, timeout=timeout, echo=echo, markers=markers), {}
    vmm = start_minivmm(args, workdir, echo=echo, markers=markers)
    done: list[RunResult] = []
    waiter = threading.Thread(target=lambda: done.append(vmm.wait(timeout)), daemon=True)
    waiter.start()
    try:
        extra = interact(vmm, workdir)
    except BaseException:
        vmm.signal(signal.SIGKILL)
        raise
    finally:
        waiter.join(timeout)
    if not done:
        raise BootFailed("the VMM did not end")
    return done[0], extra


def figures(section: Section, boot: RunResult) -> dict:
    """The figures of a finished boot; raises BootFailed (with the reason) if it did not work."""
    stats = boot.stats
    guest = parse_guest(boot.stdout)
    fig: dict = {
        **figures_partial(section, boot),
        "peak_rss_mib": boot.peak_rss_kib / 1024 if boot.peak_rss_kib is not None else None,
        "steps_ok": guest["steps_ok"],
        "steps_failed": guest["steps_failed"],
    }
    if stats is not None and stats.vcpus:
        fig.update(
            exits_by_kind=dict(stats.exits_by_kind().most_common()),
            exits_by_device=dict(stats.exits_by_device().most_common()),
            fallbacks=dict(stats.fallbacks),
            unclaimed={f"{bus} {op}": n for bus, ops in stats.unclaimed.items() for op, n in ops.items()},
            exits_total=sum(v.exits for v in stats.vcpus),
            in_run_s=sum(v.time_in_run for v in stats.vcpus),
            outside_s=sum(v.time_outside for v in stats.vcpus),
            vmm_wall_s=stats.wall_time,
        )
        fig["outside_pct"] = 100 * fig["outside_s"] / fig["vmm_wall_s"] if fig["vmm_wall_s"] else None
    if boot.timed_out:
        raise BootFailed("timed out (no poweroff); " + "; ".join(boot.notes))
    if boot.status != 0:
        raise BootFailed(f"minivmm exited with status {boot.status}: {boot.stop_reason or 'no reason given'}")
    if fig["hello_s"] is None:
        raise BootFailed(f"the init never printed {section.hello_marker!r}")
    if section.last_marker and fig["last_line_s"] is None:
        raise BootFailed(f"the init never printed {section.last_marker!r}")
    if stats is None or stats.startup is None or not stats.vcpus:
        raise BootFailed("no --stats-json statistics of a run that started a vCPU")
    if section.test_init and (guest["failures"] or guest["steps_failed"]):
        raise BootFailed("a guest step failed: " + ("; ".join(guest["failures"]) or f"done failed={guest['steps_failed']}"))
    if section.test_init and guest["steps_failed"] is None:
        raise BootFailed("the init never printed its `done ok=N failed=M` line")
    fig.update(section.parse(boot.stdout, stats))
    return fig


def figures_partial(section: Section, boot: RunResult) -> dict:
    """The timings any boot gives, a failed one too (for the JSON)."""
    return {
        "status": boot.status,
        "stop_reason": boot.stop_reason,
        "wall_s": boot.wall,
        "hello_s": boot.marks.get(section.hello_marker),
        "last_line_s": boot.marks.get(section.last_marker) if section.last_marker else None,
        "startup_s": boot.stats.startup if boot.stats else None,
    }


# -- summary and table ----------------------------------------------------------------------


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize_runs(runs: list[dict]) -> dict[str, dict]:
    """Median/min/max/n of every numeric figure over the runs that worked; exits and devices as
    "exits.KIND" and "device.NAME" (a kind missing from a run counts 0 there)."""
    ok = [r["figures"] for r in runs if r["ok"]]
    keys: list[str] = []
    for fig in ok:
        for k, v in fig.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    summary = {k: summarize([f[k] for f in ok if isinstance(f.get(k), (int, float))]) for k in keys}
    for group, prefix in (("exits_by_kind", "exits."), ("exits_by_device", "device.")):
        names: list[str] = []
        for fig in ok:
            names += [n for n in fig.get(group, {}) if n not in names]
        for name in names:
            summary[prefix + name] = summarize([fig.get(group, {}).get(name, 0) for fig in ok])
    return summary


def _fmt(fmt: str, v: float | None) -> str:
    return "-" if v is None else fmt.format(v)


def table(section: Section, summary: dict[str, dict]) -> list[str]:
    rows: list[tuple[str, str, dict]] = []
    own = {m.key: m for m in section.metrics}  # a section's own label replaces the common one
    for m in [own.pop(c.key, c) for c in COMMON_METRICS] + list(own.values()):
        if m.key in summary:
            rows.append((m.label, m.unit, {k: _fmt(m.fmt, summary[m.key][k]) for k in ("median", "min", "max")}))
    for prefix, title in (("exits.", "exits during the boot"), ("device.", "exits by device")):
        items = sorted(((k[len(prefix):], v) for k, v in summary.items() if k.startswith(prefix)), key=lambda kv: -kv[1]["median"])
        if not items:
            continue
        if prefix == "exits." and "exits_total" in summary:
            rows.append((f"{title} (all kinds)", "", {k: _fmt("{:.0f}", summary["exits_total"][k]) for k in ("median", "min", "max")}))
        else:
            rows.append((title, "", {"median": "", "min": "", "max": ""}))
        for name, s in items:
            rows.append((f"  {name}", "", {k: _fmt("{:.0f}", s[k]) for k in ("median", "min", "max")}))
    w = max([len(label) for label, _, _ in rows] + [6])
    lines = [f"  {'':<{w}}  {'median':>12}  {'min':>10}  {'max':>10}"]
    for label, unit, v in rows:
        lines.append(f"  {label:<{w}}  {v['median']:>12}  {v['min']:>10}  {v['max']:>10}  {unit}".rstrip())
    return lines


# -- host facts -----------------------------------------------------------------------------


def kvm_kind(sys_module: Path = Path("/sys/module")) -> str:
    if (sys_module / "kvm_pvm").exists():
        return "kvm_pvm (software KVM: guest kernel code is emulated)"
    for name in ("kvm_intel", "kvm_amd"):
        if (sys_module / name).exists():
            return f"{name} (hardware virtualization)"
    return "kvm (module kind unknown)" if (sys_module / "kvm").exists() else "no kvm module loaded"


def cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown"


def host_facts() -> dict:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    facts = {
        "kvm": kvm_kind(),
        "cpu_model": cpu_model(cpuinfo),
        "cpus": os.cpu_count(),
        "kernel": f"{platform.release()} {platform.version()}",
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
    }
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], check=False, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], check=False, capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            facts["minivmm_commit"] = rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return facts


def print_host(facts: dict) -> None:
    print("minivmm benchmark")
    print(f"  host KVM : {facts['kvm']}")
    print(f"  CPU      : {facts['cpu_model']} ({facts['cpus']} CPUs visible)")
    print(f"  kernel   : {facts['kernel']}")
    print(f"  python   : {facts['python']}; minivmm {facts.get('minivmm_commit', '?')}")
    print("  load avg : " + " ".join(f"{x:.2f}" for x in facts["loadavg_start"]) + " (1/5/15 min, at start)")
    print(NOISE_NOTE)
    sys.stdout.flush()


# -- main -----------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run_section(section: Section, runs: int, timeout: float, echo: bool) -> dict:
    result: dict = {"title": section.title, "cmdline": section.cmdline(), "runs": [], "ok": True, "error": None}
    for i in range(1, runs + 1):
        log(f"[{section.name} {i}/{runs}] booting: {section.cmdline()}")
        run: dict = {"run": i, "ok": False}
        with tempfile.TemporaryDirectory(prefix=f"minivmm-bench-{section.name}-") as tmp:
            boot = None
            try:
                extra = section.setup(Path(tmp)) if section.setup else []
                run["args"] = extra
                boot, own = boot_vmm([*extra, *section.vmm_args()], Path(tmp), timeout, echo, section.markers(),
                                     section.interact)  # fmt: skip
                run["figures"] = {**figures(section, boot), **own}
                run["ok"] = True
            except (BootFailed, OSError) as exc:
                run["error"] = str(exc) if isinstance(exc, BootFailed) else f"{type(exc).__name__}: {exc}"
                if boot is not None:
                    run["tail"] = tail("\n".join(boot.combined) or boot.stdout + boot.stderr)
                    run["figures"] = figures_partial(section, boot)
        result["runs"].append(run)
        if run["ok"]:
            f = run["figures"]
            log(
                f"[{section.name} {i}/{runs}] ok: first KVM_RUN {f['startup_s']:.3f} s, hello {f['hello_s']:.1f} s, "
                f"exit {f['wall_s']:.1f} s"
            )
        else:
            result["ok"] = False
            result["error"] = f"run {i}: {run['error']}"
            print(f"\n[{section.name}] FAILED (run {i}/{runs}): {run['error']}")
            if run.get("tail"):
                print(f"--- last {TAIL_LINES} lines of its output (stdout and stderr) ---")
                print(run["tail"])
                print("---")
            if i < runs:
                print(f"[{section.name}] skipping its remaining {runs - i} run(s)")
            sys.stdout.flush()
            break
    result["summary"] = summarize_runs(result["runs"])
    return result


def print_section(section: Section, result: dict) -> None:
    n_ok = sum(r["ok"] for r in result["runs"])
    print()
    print(f"[{section.name}] {section.title}: {section.describe()} ({n_ok}/{len(result['runs'])} runs ok)")
    if n_ok:
        print("\n".join(table(section, result["summary"])))
    else:
        print(f"  no figures: {result['error']}")
    sys.stdout.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py", description="Boot the minivmm default guest N times; print medians (min/max).")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, metavar="N", help=f"boots per section (default {DEFAULT_RUNS})")
    p.add_argument("--quick", action="store_true", help="one boot per section (same as --runs 1)")
    p.add_argument("--only", action="append", metavar="SECTION", help=f"run only these sections (repeatable or comma separated; {', '.join(SECTIONS)})")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the host facts, every run's figures and the summaries as JSON")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS", help=f"give up on a boot after this long (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--verbose", "-v", action="store_true", help="echo the guest console and the VMM's stderr as they arrive")
    args = p.parse_args(argv)
    if args.quick:
        args.runs = 1
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        p.error("--timeout must be a positive number of seconds")
    names = [n.strip() for item in (args.only or list(SECTIONS)) for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    args.sections = list(dict.fromkeys(names))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    json_out = None
    if args.json:
        try:  # opened before the first boot: an unwritable path must not cost the figures
            json_out = args.json.open("w")
        except OSError as exc:
            print(f"bench: error: --json {args.json}: {exc.strerror}", file=sys.stderr)
            return 2
    facts = host_facts()
    print_host(facts)
    report: dict = {"host": facts, "config": {"runs": args.runs, "sections": args.sections, "timeout_s": args.timeout}, "sections": {}}
    started = time.monotonic()
    status = 0
    try:
        for name in args.sections:
            section = SECTIONS[name]
            result = run_section(section, args.runs, args.timeout, args.verbose)
            report["sections"][name] = result
            print_section(section, result)
            if not result["ok"]:
                status = 1
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    facts["loadavg_end"] = list(os.getloadavg())
    report["elapsed_s"] = time.monotonic() - started
    print()
    print(f"load avg at the end: {' '.join(f'{x:.2f}' for x in facts['loadavg_end'])}; benchmark took {report['elapsed_s']:.0f} s")
    if json_out is not None:
        with json_out:
            json_out.write(json.dumps(report, indent=2) + "\n")
        print(f"JSON written to {args.json}")
    if status == 1:
        failed = [n for n, r in report["sections"].items() if not r["ok"]]
        print(f"FAILED: section(s) {', '.join(failed)} (see above)")
    return status


if __name__ == "__main__":
    sys.exit(main())
