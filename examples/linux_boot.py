"""Shared by the Linux steps of the tutorial (05-07): boot the default guest with
`minivmm run`, as a user does, and read what the run left behind.

Each step boots once: `boot(...)` runs ``python -m minivmm run ARGS --stats-json FILE`` through
the test suite's runner (tests/support/runner.py: streams the console, stops a run that hangs,
reads the statistics JSON back as `minivmm.stats.MachineStats`). The guest's init is the test
init (guest/testinit/minivmm-test.c, rdinit=/sbin/minivmm-test): it runs the steps named by
``minivmm.steps=...`` and prints one ``minivmm-test: ...`` line per step.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "tests", REPO / "bench", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench import MKFS_EXT4_ARGS, mkfs_ext4  # noqa: E402
from support.runner import RunResult, run_minivmm  # noqa: E402

from minivmm import layout  # noqa: E402
from minivmm.stats import ExitRecord  # noqa: E402

__all__ = ["boot", "exits_window", "init_lines", "make_ext4", "read_file_in_ext4"]

BOOT_TIMEOUT = 900.0  # seconds; a boot takes 1-2 minutes of a core (longer on software KVM)
INIT_CMDLINE = "console=ttyS0 panic=-1 reboot=k rdinit=/sbin/minivmm-test"
_INIT_LINE = re.compile(r"minivmm-test: (.*?)\s*$")


def boot(workdir: Path, steps: str, *args: str) -> RunResult:
    """Boot the default guest running the test init's `steps`, then power off; fails loudly."""
    cmdline = f"{INIT_CMDLINE} minivmm.steps={steps} minivmm.end=poweroff"
    run = run_minivmm(["--cmdline", cmdline, *args], workdir, timeout=BOOT_TIMEOUT)
    if run.timed_out or run.status != 0 or run.stats is None:
        sys.exit(f"the boot failed:\n{run.describe()}")
    return run


def init_lines(console: str) -> list[str]:
    """The test init's lines in a run's console output, in order, each once (with
    console=ttyS0 each appears twice: written to the console and logged through the kernel)."""
    out: list[str] = []
    for line in console.splitlines():
        m = _INIT_LINE.search(line)
        if m and m.group(1) not in out:
            out.append(m.group(1))
    return out


def exits_window(log: list[ExitRecord], begin: str, end: str) -> tuple[int, int]:
    """(first, last + 1): the slice of a traced run's exit log made after the guest finished
    printing `begin` on the serial console and before it printed `end`'s first character (the
    console text is rebuilt from the writes to COM1's THR, which places every exit)."""
    thr = [i for i, r in enumerate(log) if r.kind == "io" and r.op == "out" and r.addr == layout.COM1_PORT]
    console = "".join(chr(log[i].value) for i in thr)
    start = console.rfind(begin)
    stop = console.find(end, start + len(begin)) if start >= 0 else -1
    if start < 0 or stop < 0:
        sys.exit(f"the exit log has no {begin!r} ... {end!r} in the console output")
    return thr[start + len(begin) - 1] + 1, thr[stop]


def make_ext4(path: Path, size: int = 256 << 20) -> Path:
    """A sparse file formatted ext4 on the host, as the benchmark makes them (4 KiB blocks:
    ext4 refuses DAX otherwise)."""
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run([mkfs_ext4(), *MKFS_EXT4_ARGS, str(path)], check=True)
    return path


def read_file_in_ext4(image: Path, path_in_fs: str) -> str | None:
    """The contents of a file in an ext4 image, read with debugfs (never mounted); None if absent."""
    done = subprocess.run(["debugfs", "-R", f"cat {path_in_fs}", str(image)], capture_output=True, text=True)
    if done.returncode != 0 or "File not found" in done.stderr:
        return None
    return done.stdout
