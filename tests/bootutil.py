"""Running minivmm for the boot and command-line tests, through the one runner
(tests/support/runner.py): a run's statistics come from its --stats-json, its console from
its stdout; a timeout fails the test with the tail of both outputs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from support.runner import RunResult
from support.runner import run_minivmm as _run

BOOT_TIMEOUT = 900.0  # seconds; a boot takes 2-3 minutes of one core on software KVM
CLI_TIMEOUT = 60.0  # an error path needs about a second; generous for a loaded machine
SOFTWARE_KVM = Path("/sys/module/kvm_pvm").exists()


def run_minivmm(args: Sequence[str | os.PathLike[str]], workdir: Path, timeout: float = BOOT_TIMEOUT, name: str = "minivmm") -> RunResult:
    """``python -m minivmm run ARGS --stats-json ...`` to completion; outputs in `workdir`/NAME.*."""
    return _finished(_run(args, workdir, timeout=timeout, name=name), timeout)


def cli(*args: str | os.PathLike[str], workdir: Path, timeout: float = CLI_TIMEOUT) -> RunResult:
    """``python -m minivmm ARGS`` exactly as given (no --stats-json added)."""
    return _finished(_run(args, workdir, timeout=timeout, name="cli", command=None), timeout)


def _finished(run: RunResult, timeout: float) -> RunResult:
    if run.timed_out:
        pytest.fail(f"minivmm did not finish within {timeout:g} s\n{run.describe()}", pytrace=False)
    return run


# --- reading a guest's output ------------------------------------------------------------------

TRACEBACK = "Traceback (most recent call last)"

def init_lines(stdout: str) -> list[str]:
    """The test init's result lines (console copies; each starts with "minivmm-test: "), prefix removed.

    The init writes each line to /dev/kmsg and to /dev/console, so a line can show up twice:
    once as-is and once as a kernel log record; both are kept, in order."""
    found = []
    for line in stdout.splitlines():
        i = line.find("minivmm-test: ")
        if i >= 0:
            found.append(line[i + len("minivmm-test: ") :].rstrip("\r"))
    return found

def index_of(lines: Sequence[str], pattern: str, start: int = 0) -> int:
    """Index of the first line at or after `start` matching regex `pattern`, or -1."""
    rx = re.compile(pattern)
    for i in range(start, len(lines)):
        if rx.search(lines[i]):
            return i
    return -1

def kernel_command_line(stdout: str) -> str | None:
    """The command line the kernel echoes early in boot ("Command line: ...")."""
    m = re.search(r"^(?:\[[ 0-9.]+\] )?Command line: (.*?)\r?$", stdout, re.MULTILINE)
    return m.group(1) if m else None
