"""Running minivmm as a subprocess, the way a user does, for the boot and command-line tests.

`run_minivmm` starts ``python -m minivmm ...`` from this checkout (PYTHONPATH points at the
repository root, so the code under test is this worktree's, installed or not), with stdin from
/dev/null and stdout/stderr going to files (a guest's kernel log can be large, and a file keeps
whatever was written before a timeout). It returns a `Run`; a timeout kills the whole process
group and fails the test with the tail of both outputs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BOOT_TIMEOUT = 900.0  # seconds; a boot takes 2-3 minutes of one core on software KVM
CLI_TIMEOUT = 60.0  # an error path needs about a second; generous for a loaded machine
SOFTWARE_KVM = Path("/sys/module/kvm_pvm").exists()

@dataclass
class Run:
    """One finished minivmm process."""

    argv: list[str]
    status: int
    stdout: str
    stderr: str
    seconds: float

    def __iter__(self):  # status, stdout, stderr, seconds = run_minivmm(...)
        return iter((self.status, self.stdout, self.stderr, self.seconds))

    def describe(self, lines: int = 40) -> str:
        """The command, status and the tails of both outputs, for assertion messages."""
        return (
            f"command: {' '.join(_short(a) for a in self.argv)}\nstatus {self.status} after {self.seconds:.1f} s\n"
            f"--- stdout (last {lines} lines) ---\n{tail(self.stdout, lines)}\n"
            f"--- stderr (last {lines} lines) ---\n{tail(self.stderr, lines)}"
        )

def _short(arg: str, limit: int = 200) -> str:
    return arg if len(arg) <= limit else f"{arg[:limit]}...({len(arg)} chars)"


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])

def minivmm_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("PYTHONWARNINGS", None)
    return env

def run_minivmm(args: Sequence[str], workdir: Path, timeout: float = BOOT_TIMEOUT, name: str = "minivmm") -> Run:
    """Run ``python -m minivmm *args`` to completion; outputs land in `workdir`/name.{stdout,stderr}."""
    argv = [sys.executable, "-m", "minivmm", *map(str, args)]
    out_path = workdir / f"{name}.stdout"
    err_path = workdir / f"{name}.stderr"
    start = time.monotonic()
    with open(os.devnull, "rb") as stdin, open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=err, env=minivmm_env(), cwd=workdir, start_new_session=True)
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            run = Run(argv, -1, _read(out_path), _read(err_path), time.monotonic() - start)
            pytest.fail(f"minivmm did not finish within {timeout:g} s\n{run.describe()}", pytrace=False)
        except BaseException:
            _kill_group(proc)
            raise
    return Run(argv, status, _read(out_path), _read(err_path), time.monotonic() - start)

def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the process we started (it leads its own session), and wait for it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()

def _read(path: Path) -> str:
    """The text of an output file, with the serial console's CRLF line ends made LF."""
    return path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")

def cli(*args: str | os.PathLike[str], workdir: Path, timeout: float = CLI_TIMEOUT) -> Run:
    return run_minivmm([os.fspath(a) for a in args], workdir, timeout=timeout, name="cli")

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

def stats_exits(stderr: str) -> dict[str, int]:
    """The ``  exits KIND: N`` lines of --stats."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+exits (\S+): (\d+)$", stderr, re.MULTILINE)}

def stats_devices(stderr: str) -> dict[str, int]:
    """The ``  device NAME: N`` lines of --stats."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+device (\S+): (\d+)$", stderr, re.MULTILINE)}
