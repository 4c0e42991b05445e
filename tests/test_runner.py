"""The one runner of the boot tests and the benchmark (tests/support/runner.py), driving the real
`python -m minivmm run` on real KVM with tiny synthetic kernels (a second or so each)."""

from __future__ import annotations

import signal
from pathlib import Path

from support.runner import run_minivmm
from support.synthetic_kernels import make_pvh_elf, smoke_pvh_elf

from minivmm import layout

SPIN = b"\xeb\xfe"  # jmp $


def print_code(message: bytes) -> bytes:
    """mov dx, COM1; then mov al, ch; out dx, al for each byte (valid in 32- and 64-bit mode)."""
    return b"\x66\xba" + layout.COM1_PORT.to_bytes(2, "little") + b"".join(bytes([0xB0, ch, 0xEE]) for ch in message)


def test_a_run_gives_console_statistics_and_marks(tmp_path: Path) -> None:
    k = tmp_path / "k"
    k.write_bytes(smoke_pvh_elf(b"hello\r\nsecond line\r\n"))
    run = run_minivmm(["--kernel", k], tmp_path / "work", timeout=60, name="smoke", markers=["second line", "never printed"])
    assert run.status == 0 and not run.timed_out and run.notes == [], run.describe()
    assert run.stdout == "hello\nsecond line\n"  # CRLF made LF
    assert run.stderr.splitlines()[-1] == "minivmm: guest powered off (ACPI S5)"
    assert run.stats is not None and run.stop_reason == "guest powered off (ACPI S5)" and run.stats.stop_status == 0
    assert run.stats.vcpus[0].by_device["serial"] == len("hello\r\nsecond line\r\n")
    assert set(run.marks) == {"second line"} and 0 < run.marks["second line"] <= run.wall
    assert run.out_path == tmp_path / "work" / "smoke.stdout" and run.out_path.read_bytes() == b"hello\r\nsecond line\r\n"
    assert run.err_path is not None and run.err_path.read_text() == run.stderr
    assert run.peak_rss_kib is not None and run.peak_rss_kib > 1024
    assert "--stats-json" in run.argv and (tmp_path / "work" / "smoke.stats.json").is_file()


def test_a_run_past_its_timeout_is_dumped_then_stopped(tmp_path: Path) -> None:
    """A spinning guest: after the timeout a vCPU dump (SIGUSR1: the guest printed, so the VMM is
    ready for it), then SIGTERM, which still ends the run cleanly with its statistics."""
    k = tmp_path / "k"
    k.write_bytes(make_pvh_elf(print_code(b"ready\n") + SPIN))
    run = run_minivmm(["--kernel", k], tmp_path, timeout=8, markers=["ready"])
    assert run.timed_out and "ready" in run.marks, run.describe()
    assert [n.split(" after ")[0] if n.startswith("SIGTERM") else n.split(": ")[-1] for n in run.notes] == ["SIGUSR1 (vCPU dump)", "SIGTERM"]
    assert any(line.startswith("code at 0x") and ": eb fe" in line for line in run.stderr.splitlines()), run.describe()  # the dump
    assert run.status == 0 and run.stats is not None and run.stop_reason == f"stopped by {signal.SIGTERM.name}"
