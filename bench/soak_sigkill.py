#!/usr/bin/env python3
"""Crash safety, measured (issue 9, item 7): SIGKILL minivmm at random moments while the guest
writes an increasing counter to a virtio-pmem device, and check no acknowledged value is lost.

Usage:
    python3 bench/soak_sigkill.py [--kills N] [--max-delay SECONDS] [--seed N] [--timeout SECONDS]
                                  [--kernel VMLINUX --initrd INITRAMFS] [--verbose]

Each round boots the default guest with one --pmem backing file (the same file every round)
and `minivmm.script=soak` (guest/scripts/soak.sh): the guest reads the counter at the start
of /dev/pmem0, then forever writes the next value with `dd conv=fsync` (a virtio-pmem FLUSH,
answered after the host's fdatasync) and prints `minivmm: soak ack N` on the console. Once
the first ack of the round has arrived, the host waits a random time (0 to --max-delay
seconds) and kills minivmm with SIGKILL. Then it reads the counter from the backing file: it
must hold at least the last acknowledged value (it may be ahead: a write in flight when the
VMM died). The next round continues from there.

Printed per kill and in total: the acknowledged values, the value found in the file and the
lag (file value minus last ack). Exit status: 0 if no acknowledged value was lost and every
round reached its first ack, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 16 << 20  # the smallest sensible pmem device (a multiple of 2 MiB)
RECORD = 21  # guest/scripts/soak.sh: the value left-justified in 20 bytes, then "\n"
CMDLINE = "console=ttyS0 quiet panic=-1 reboot=k minivmm.script=soak minivmm.nomount"
ACK_RE = re.compile(r"minivmm: soak ack (\d+)\r?$")
FAILED_RE = re.compile(r"minivmm: soak failed.*")


@dataclass
class Round:
    """One boot killed with SIGKILL."""

    start_value: int  # the counter in the file before the boot
    acks: list[int] = field(default_factory=list)  # values acknowledged on the console, in order
    delay: float = 0.0  # seconds from the first ack to the kill
    killed: bool = False  # SIGKILL sent while the VMM ran (not: it ended on its own)
    file_value: int = -1  # the counter in the file after the kill
    error: str | None = None
    output_tail: list[str] = field(default_factory=list)

    @property
    def last_ack(self) -> int | None:
        return self.acks[-1] if self.acks else None

    @property
    def lag(self) -> int | None:
        return None if self.last_ack is None else self.file_value - self.last_ack

    @property
    def ok(self) -> bool:
        return self.error is None and self.killed and self.last_ack is not None and self.file_value >= self.last_ack


def write_record(path: Path, value: int) -> None:
    with open(path, "r+b") as f:
        f.write(f"{value:<20d}\n".encode())


def read_record(path: Path) -> int:
    with open(path, "rb") as f:
        return int(f.read(RECORD).decode("ascii", "replace").strip() or -1)


def run_round(image: Path, rng: random.Random, max_delay: float, timeout: float, verbose: bool, guest_args: list[str]) -> Round:
    """Boot, wait for the first ack, kill at a random moment after it, read the file back."""
    rnd = Round(start_value=read_record(image))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "minivmm", "run", *guest_args, "--pmem", str(image), "--cmdline", CMDLINE]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    kill_at: float | None = None
    first_ack_at = 0.0
    pending, lines = b"", []
    try:
        while True:
            now = time.monotonic()
            if kill_at is not None and now >= kill_at and not rnd.killed:
                proc.send_signal(signal.SIGKILL)
                rnd.killed, rnd.delay = True, now - first_ack_at
            if kill_at is None and now > deadline:
                rnd.error = f"no ack within {timeout:g} s"
                proc.kill()
            if not sel.select(timeout=0.01):
                continue
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                break  # EOF: the VMM is gone; every line it printed has been read
            if verbose:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
            *complete, pending = (pending + data).split(b"\n")
            for raw in complete:  # only whole lines: a cut-off "ack 12" of "ack 123" is no ack
                line = raw.decode("utf-8", "replace")
                lines.append(line)
                if m := ACK_RE.search(line):
                    rnd.acks.append(int(m.group(1)))
                    if kill_at is None:
                        first_ack_at = time.monotonic()
                        kill_at = first_ack_at + rng.uniform(0.0, max_delay)
                elif FAILED_RE.search(line) and rnd.error is None:
                    rnd.error = FAILED_RE.search(line).group(0)
    finally:
        sel.close()
        proc.stdout.close()
        proc.wait()
    rnd.output_tail = lines[-15:]
    if not rnd.killed and rnd.error is None:
        rnd.error = f"minivmm ended on its own (status {proc.returncode}) before the kill"
    rnd.file_value = read_record(image)
    if rnd.acks and rnd.acks != list(range(rnd.start_value + 1, rnd.start_value + 1 + len(rnd.acks))):
        rnd.error = rnd.error or "acks are not consecutive from the file's value"
    return rnd


def soak(
    kills: int,
    max_delay: float = 3.0,
    timeout: float = 600.0,
    seed: int | None = None,
    verbose: bool = False,
    workdir: Path | None = None,
    kernel: Path | None = None,
    initrd: Path | None = None,
) -> list[Round]:
    """`kills` rounds on one backing file in `workdir` (a temporary directory by default),
    booting `kernel`/`initrd` (default: the default guest, as `minivmm run` finds it)."""
    guest_args = [*(["--kernel", str(kernel)] if kernel else []), *(["--initrd", str(initrd)] if initrd else [])]
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="minivmm-soak-", dir=workdir) as tmp:
        image = Path(tmp) / "soak.img"
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        write_record(image, 0)
        rounds = []
        for i in range(kills):
            rnd = run_round(image, rng, max_delay, timeout, verbose, guest_args)
            rounds.append(rnd)
            print(describe_round(i + 1, kills, rnd), flush=True)
            if rnd.error is not None and not rnd.acks:
                break  # the guest does not get going: more rounds would only repeat that
        return rounds


def describe_round(i: int, n: int, r: Round) -> str:
    verdict = "ok" if r.ok else f"FAILED: {r.error or 'acknowledged value lost'}"
    acks = f"acks {r.acks[0]}..{r.acks[-1]} ({len(r.acks)})" if r.acks else "no acks"
    line = f"kill {i}/{n}: {acks}, killed {r.delay:.2f} s after the first ack; file holds {r.file_value}, lag {r.lag} -> {verdict}"
    if not r.ok:
        line += "\n" + "\n".join(f"    | {t}" for t in r.output_tail)
    return line


def summary(rounds: list[Round]) -> str:
    acks = sum(len(r.acks) for r in rounds)
    lags = [r.lag for r in rounds if r.lag is not None]
    lost = [r for r in rounds if r.last_ack is not None and r.file_value < r.last_ack]
    return (
        f"soak: {sum(r.killed for r in rounds)} kills, {acks} acknowledged values, "
        f"lag (file - last ack) min {min(lags, default=0)} max {max(lags, default=0)}, "
        f"{len(lost)} with an acknowledged value lost, {sum(not r.ok for r in rounds)} rounds failed"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="rounds, each ended by SIGKILL (default 10)")
    parser.add_argument("--max-delay", type=float, default=3.0, help="kill up to this many seconds after the first ack (default 3)")
    parser.add_argument("--seed", type=int, help="random seed (default: random)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a boot may take to its first ack (default 600)")
    parser.add_argument("--kernel", type=Path, help="guest kernel (default: the default guest's)")
    parser.add_argument("--initrd", type=Path, help="guest initramfs holding guest/scripts/soak.sh (default: the default guest's)")
    parser.add_argument("--verbose", action="store_true", help="echo the guest console")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.max_delay < 0 or args.timeout <= 0:
        parser.error("--kills must be >= 1, --max-delay >= 0 and --timeout > 0")
    rounds = soak(args.kills, args.max_delay, args.timeout, args.seed, args.verbose, kernel=args.kernel, initrd=args.initrd)
    print(summary(rounds))
    return 0 if len(rounds) == args.kills and all(r.ok for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
