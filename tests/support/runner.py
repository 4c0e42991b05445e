"""Running minivmm as a subprocess, the way a user does: the one runner of the boot tests and
the benchmark (bench/bench.py puts tests/ on its path to import it).

`start_minivmm` spawns ``python -m minivmm run ARGS --stats-json FILE`` from this checkout
(PYTHONPATH points at the repository root, so the code under test is this tree's, installed
or not) in its own session; `Minivmm.wait` streams its stdout (the guest console) and stderr
into files in the work directory as they arrive (a file keeps whatever came before a timeout),
notes when console markers first arrive, and returns a `RunResult` with the statistics read
from the JSON the VMM wrote (`minivmm.stats.MachineStats`): nothing here parses minivmm's
own text. `run_minivmm` is both in one call.

A run that outlives its timeout is asked for a vCPU dump (SIGUSR1, only once the console
shows the guest runs: before that the signal would kill the VMM), then stopped with SIGTERM
(the VMM still writes its statistics), then killed (SIGKILL to its process group).
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from json import JSONDecodeError
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # bench/bench.py imports this module without minivmm on its path
    sys.path.insert(0, str(REPO_ROOT))

from minivmm.stats import MachineStats  # noqa: E402

DUMP_GRACE_S = 5.0  # after SIGUSR1, for the vCPU dump to be printed
STOP_GRACE_S = 20.0  # after SIGTERM, for a clean stop (statistics written) before SIGKILL
TAIL_LINES = 40


def minivmm_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a run: this checkout first on PYTHONPATH, no warnings on stderr."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("PYTHONWARNINGS", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # the VMM's start-up time is measured: use the bytecode cache
    env.update(extra or {})
    return env


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


class StreamWatcher:
    """Collects a child's output chunk by chunk and notes when markers first arrive.

    `feed(data, t)` appends bytes received at time t; `first_seen[marker]` is the arrival time
    of the chunk that completed the marker's first occurrence (lines may arrive in pieces).
    `lines` are (t, text) pairs of complete lines, t being when their end arrived.
    """

    def __init__(self, markers: Iterable[str] = ()) -> None:
        self.markers = list(markers)
        self.first_seen: dict[str, float] = {}
        self.lines: list[tuple[float, str]] = []
        self._partial = ""
        self._chunks: list[str] = []

    def feed(self, data: bytes, t: float) -> None:
        text = data.decode("utf-8", "replace")
        self._chunks.append(text)
        buf = self._partial + text
        *complete, self._partial = buf.split("\n")
        for line in complete:
            self.lines.append((t, line.rstrip("\r")))
        for marker in self.markers:
            if marker in self.first_seen:
                continue
            # Search the complete lines and the unfinished one, not the whole history.
            if any(marker in line for line in complete) or marker in self._partial:
                self.first_seen[marker] = t

    def close(self, t: float) -> None:
        if self._partial:
            self.lines.append((t, self._partial.rstrip("\r")))
            self._partial = ""

    @property
    def text(self) -> str:
        return "".join(self._chunks)


@dataclass
class RunResult:
    """One finished minivmm process.

    `stdout` is, for a run, the guest's serial console (CRLF made LF), `stats` what it wrote
    to --stats-json (None if it wrote nothing readable), `wall` seconds from the spawn to the
    exit, `marks` the console markers' arrival times (seconds after the spawn)."""

    argv: list[str]
    status: int | None  # None: it never exited by itself (killed after the timeout)
    stdout: str
    stderr: str
    wall: float
    stats: MachineStats | None
    timed_out: bool = False
    marks: dict[str, float] = field(default_factory=dict)
    peak_rss_kib: int | None = None  # wait4's ru_maxrss
    notes: list[str] = field(default_factory=list)  # what the runner did (signals after the timeout)
    combined: list[str] = field(default_factory=list)  # both streams' lines, in arrival order
    out_path: Path | None = None
    err_path: Path | None = None

    @property
    def stop_reason(self) -> str | None:
        return self.stats.stop_reason if self.stats else None

    def describe(self, lines: int = TAIL_LINES) -> str:
        """The command, status and the tails of both outputs, for failure messages."""
        ended = f"status {self.status}" + (" (timed out: " + "; ".join(self.notes) + ")" if self.timed_out else "")
        return (
            f"command: {' '.join(_short(a) for a in self.argv)}\n{ended} after {self.wall:.1f} s\n"
            f"--- stdout, the console (last {lines} lines{_where(self.out_path)}) ---\n{tail(self.stdout, lines)}\n"
            f"--- stderr (last {lines} lines{_where(self.err_path)}) ---\n{tail(self.stderr, lines)}"
        )


def _short(arg: str, limit: int = 200) -> str:
    return arg if len(arg) <= limit else f"{arg[:limit]}...({len(arg)} chars)"


def _where(path: Path | None) -> str:
    return f", {path}" if path else ""


@dataclass(frozen=True)
class _Stream:
    """One captured output: the pipe, its watcher, the file copy and where --verbose echoes it."""

    pipe: IO[bytes]
    watcher: StreamWatcher
    copy: IO[bytes]
    echo: IO[bytes]


class Minivmm:
    """A started minivmm process; `wait` collects its output and returns the `RunResult`."""

    def __init__(
        self,
        argv: list[str],
        workdir: Path,
        name: str,
        stats_path: Path | None,
        stdin: int | None,
        stdout: int | None,
        env: Mapping[str, str] | None,
        markers: Iterable[str],
        echo: bool,
    ) -> None:
        self.argv = argv
        self.stats_path = stats_path
        self.echo = echo
        self.out_path = workdir / f"{name}.stdout" if stdout is None else None
        self.err_path = workdir / f"{name}.stderr"
        self.out = StreamWatcher(markers)
        self.err = StreamWatcher()
        self.combined: list[str] = []
        self.notes: list[str] = []
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=subprocess.PIPE if stdout is None else stdout,
            stderr=subprocess.PIPE,
            env=minivmm_env(env),
            cwd=workdir,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def wait(self, timeout: float) -> RunResult:
        """Stream the outputs until the process exits, escalating `timeout` seconds from now.

        Until `wait` is called nothing reads the pipes: a caller that interacts first (through
        a pseudo-terminal on stdin/stdout) should keep stderr short (no --trace)."""
        copies: list[IO[bytes]] = []
        sel = selectors.DefaultSelector()
        stopper = _Stopper(self, timeout)
        try:
            for pipe, watcher, path, echo in (
                (self.proc.stdout, self.out, self.out_path, sys.stdout),
                (self.proc.stderr, self.err, self.err_path, sys.stderr),
            ):
                if pipe is not None and path is not None:
                    copies.append(open(path, "wb"))
                    sel.register(pipe, selectors.EVENT_READ, _Stream(pipe, watcher, copies[-1], echo.buffer))
            while sel.get_map():
                stopper.step()
                for key, _ in sel.select(timeout=0.5):
                    self._read(sel, key.data)
            while (waited := os.wait4(self.proc.pid, os.WNOHANG))[0] == 0:  # pipes closed; still tearing down
                stopper.step()
                time.sleep(0.01)
        except BaseException:
            self.kill()
            raise
        finally:
            sel.close()
            for copy in copies:
                copy.close()
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()
        _, wait_status, rusage = waited
        self.proc.returncode = os.waitstatus_to_exitcode(wait_status)
        return RunResult(
            argv=self.argv,
            status=None if stopper.killed else self.proc.returncode,
            stdout=self.out.text.replace("\r\n", "\n"),
            stderr=self.err.text,
            wall=self.elapsed(),
            stats=self._stats(),
            timed_out=stopper.fired,
            marks=dict(self.out.first_seen),
            peak_rss_kib=rusage.ru_maxrss,
            notes=self.notes,
            combined=self.combined,
            out_path=self.out_path,
            err_path=self.err_path,
        )

    def _read(self, sel: selectors.BaseSelector, stream: _Stream) -> None:
        data = os.read(stream.pipe.fileno(), 65536)
        t = self.elapsed()
        if not data:
            sel.unregister(stream.pipe)
            stream.watcher.close(t)
            return
        stream.copy.write(data)
        stream.copy.flush()
        before = len(stream.watcher.lines)
        stream.watcher.feed(data, t)
        self.combined += [line for _, line in stream.watcher.lines[before:]]
        if self.echo:
            stream.echo.write(data)
            stream.echo.flush()

    def _stats(self) -> MachineStats | None:
        if self.stats_path is None or not self.stats_path.is_file():
            return None
        text = self.stats_path.read_text()
        if not text:
            return None  # created by the pre-boot check, never written: the VMM did not get that far
        try:
            return MachineStats.from_json(text)
        except (JSONDecodeError, KeyError, ValueError) as exc:
            self.notes.append(f"--stats-json {self.stats_path} unreadable: {exc}")
            return None

    def signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the process group and reap the process."""
        self.signal(signal.SIGKILL)
        self.proc.wait()


class _Stopper:
    """After the timeout: SIGUSR1 (if the guest ever printed), SIGTERM, SIGKILL, with graces."""

    def __init__(self, run: Minivmm, timeout: float) -> None:
        self.run = run
        self.next_at = run.elapsed() + timeout
        self.stage = 0
        self.fired = False
        self.killed = False

    def step(self) -> None:
        now = self.run.elapsed()
        if now < self.next_at or self.stage > 2:
            return
        self.fired = True
        if self.stage == 0 and self.run.out.text:  # the guest printed, so the VMM's handlers are in place
            self.run.notes.append(f"no exit after {now:.0f} s: SIGUSR1 (vCPU dump)")
            self.run.signal(signal.SIGUSR1)
            self.stage, self.next_at = 1, now + DUMP_GRACE_S
        elif self.stage <= 1:
            self.run.notes.append(f"SIGTERM after {now:.0f} s")
            self.run.signal(signal.SIGTERM)
            self.stage, self.next_at = 2, now + STOP_GRACE_S
        else:
            self.run.notes.append(f"still running {STOP_GRACE_S:g} s after SIGTERM: SIGKILL")
            self.run.signal(signal.SIGKILL)
            self.stage, self.killed = 3, True


def start_minivmm(
    args: Sequence[str | os.PathLike[str]],
    workdir: Path,
    *,
    name: str = "minivmm",
    command: str | None = "run",
    stats: bool = True,
    stdin: int | None = None,
    stdout: int | None = None,
    env: Mapping[str, str] | None = None,
    markers: Iterable[str] = (),
    echo: bool = False,
) -> Minivmm:
    """Spawn ``python -m minivmm COMMAND ARGS`` in `workdir` (outputs in NAME.stdout/.stderr).

    For `command` "run" with `stats`, ``--stats-json NAME.stats.json`` is added. `stdin` and
    `stdout` are file descriptors (e.g. a pseudo-terminal's slave; stdout given is not
    captured); by default stdin is /dev/null and stdout is captured. `env` adds variables."""
    workdir.mkdir(parents=True, exist_ok=True)
    stats_path = workdir / f"{name}.stats.json" if command == "run" and stats else None
    if stats_path is not None:
        stats_path.unlink(missing_ok=True)  # a file from an earlier run must not pass for this one's
    argv = [sys.executable, "-m", "minivmm", *([command] if command else []), *map(os.fspath, args)]
    argv += ["--stats-json", str(stats_path)] if stats_path is not None else []
    return Minivmm(argv, workdir, name, stats_path, stdin, stdout, env, markers, echo)


def run_minivmm(args: Sequence[str | os.PathLike[str]], workdir: Path, *, timeout: float, **kw: object) -> RunResult:
    """`start_minivmm` and wait for the end (see `Minivmm.wait` for what a timeout does)."""
    return start_minivmm(args, workdir, **kw).wait(timeout)  # type: ignore[arg-type]
