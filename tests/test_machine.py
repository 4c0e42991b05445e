"""The whole `minivmm run` path on real KVM with tiny synthetic kernels (milliseconds each):
boot protocols, how a run ends, --trace/--stats, the watchdog, SIGUSR1/SIGTERM and the
console's Ctrl-A x through a pseudo-terminal."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from minivmm import layout
from support.idle import wait_until
from support.synthetic_kernels import make_bzimage, make_pvh_elf, smoke_bzimage, smoke_code, smoke_pvh_elf

SPIN = b"\xeb\xfe"  # jmp $
UD2 = b"\x0f\x0b"  # #UD with no IDT: the CPU cannot deliver it -> triple fault


def print_code(message: bytes) -> bytes:
    """mov dx, COM1; then mov al, ch; out dx, al for each byte (valid in 32- and 64-bit mode)."""
    code = b"\x66\xba" + layout.COM1_PORT.to_bytes(2, "little")
    return code + b"".join(bytes([0xB0, ch, 0xEE]) for ch in message)


def minivmm(*args: str | Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "minivmm", "run", *map(str, args)],
        stdin=kw.pop("stdin", subprocess.DEVNULL),
        stdout=kw.pop("stdout", subprocess.PIPE),
        stderr=kw.pop("stderr", subprocess.PIPE),
        text=True,
        **kw,
    )


def run(*args: str | Path, timeout: float = 60) -> tuple[int, str, str]:
    proc = minivmm(*args)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def kernel(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path




@pytest.mark.parametrize("fmt", ["pvh", "linux", "bzimage"])
def test_synthetic_kernel_prints_and_powers_off(tmp_path: Path, fmt: str) -> None:
    """The same ELF through either protocol (`--boot`), and a bzImage (the smoke code runs in
    32- and 64-bit mode alike)."""
    message = f"hello from {fmt}\n".encode()
    data = smoke_bzimage(message) if fmt == "bzimage" else smoke_pvh_elf(message)
    boot = ("--boot", "pvh") if fmt == "pvh" else ()
    status, out, err = run("--kernel", kernel(tmp_path, fmt, data), *boot, "--stats")
    assert status == 0, err
    assert f"hello from {fmt}\n" in out
    assert err.strip().splitlines()[-1] == "minivmm: guest powered off (ACPI S5)"
    # --stats: exits by kind and by device, in/outside KVM_RUN, start-up time
    assert "exits io: " in err and "device serial: " in err and "device acpi-sleep: 1" in err
    assert "in KVM_RUN" in err and "outside" in err
    assert "startup: first KVM_RUN" in err
    assert "Traceback" not in err


def test_trace_prints_each_exit_in_words(tmp_path: Path) -> None:
    status, out, err = run("--kernel", kernel(tmp_path, "k", smoke_pvh_elf(b"AB")), "--boot", "pvh", "--trace")
    assert status == 0, err
    assert f"io out port={layout.COM1_PORT:#06x} size=1 value=0x41 -> serial" in err
    assert f"io out port={layout.COM1_PORT:#06x} size=1 value=0x42 -> serial" in err
    assert f"port={layout.ACPI_SLEEP_CONTROL_PORT:#06x} size=1 value=0x34 -> acpi-sleep" in err
    assert "boot: pvh entry protected32" in err
    assert "map: " in err and " ram" in err


def test_triple_fault_ends_with_status_1_and_a_dump(tmp_path: Path) -> None:
    status, out, err = run("--kernel", kernel(tmp_path, "k", make_pvh_elf(UD2)))
    assert status == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("minivmm: guest triple-faulted") and "0f 0b" in last
    assert "rip=" in err and "rflags=" in err and "cr0=" in err  # the vCPU dump
    assert "Traceback" not in err


def test_watchdog_dumps_state_and_stops_a_spinning_guest(tmp_path: Path) -> None:
    t0 = time.monotonic()
    status, out, err = run("--kernel", kernel(tmp_path, "k", make_pvh_elf(SPIN)), "--watchdog", "1")
    assert status == 1
    assert time.monotonic() - t0 < 30
    assert "code at 0x1000000: eb fe" in err
    assert err.strip().splitlines()[-1] == "minivmm: watchdog: no exit to the VMM for 1 s"


def test_sigusr1_dumps_state_and_sigterm_stops_cleanly(tmp_path: Path) -> None:
    code = print_code(b"ready\n")
    proc = minivmm("--kernel", kernel(tmp_path, "k", make_pvh_elf(code + SPIN)), stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None and proc.stdout is not None
        os.set_blocking(proc.stderr.fileno(), False)
        os.set_blocking(proc.stdout.fileno(), False)
        out = b""

        def ready() -> bool:  # the guest runs: the signal handlers are installed
            nonlocal out
            try:
                out += os.read(proc.stdout.fileno(), 4096)
            except BlockingIOError:
                pass
            return b"ready" in out

        wait_until(ready, "the guest's ready line", timeout=120)
        proc.send_signal(signal.SIGUSR1)
        seen = ""
        rip = 0x1000000 + len(code)

        def read_stderr() -> str:
            # os.read, not the text wrapper: its read() raises TypeError on an empty non-blocking pipe
            try:
                return os.read(proc.stderr.fileno(), 65536).decode(errors="replace")
            except BlockingIOError:
                return ""

        def dumped() -> bool:
            nonlocal seen
            seen += read_stderr()
            return f"code at {rip:#x}: eb fe" in seen and f"{rip:#x}: eb fe  jmp {rip:#x}" in seen

        wait_until(dumped, "the vCPU dump", timeout=120)
        assert proc.poll() is None  # still running after the dump
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        while chunk := read_stderr():
            seen += chunk
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert seen.strip().splitlines()[-1] == "minivmm: stopped by SIGTERM"
    assert "Traceback" not in seen


def test_ctrl_a_x_quits_and_restores_the_terminal(tmp_path: Path) -> None:
    """Through a real pseudo-terminal: raw mode while running, the original mode after."""
    k = kernel(tmp_path, "k", make_pvh_elf(print_code(b"ready\n") + SPIN))
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    proc = minivmm("--kernel", k, stdin=slave, stdout=slave, stderr=subprocess.PIPE)
    try:
        out = b""
        deadline = time.monotonic() + 30
        while b"ready" not in out and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                out += os.read(master, 4096)
        assert b"ready" in out
        assert not termios.tcgetattr(slave)[3] & termios.ICANON  # raw mode while running
        os.write(master, b"\x01x")
        proc.wait(timeout=120)
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait()
        after = termios.tcgetattr(slave)
        os.close(master)
        os.close(slave)
    assert proc.returncode == 0, err
    assert "quit from the console" in err
    assert after == before


def test_vmlinux_boots_with_the_linux_protocol_by_default(tmp_path: Path) -> None:
    """An ELF without --boot: the 64-bit entry at e_entry with boot_params and the RNG seed."""
    status, out, err = run("--kernel", kernel(tmp_path, "k", smoke_pvh_elf(b"x")), "--trace")
    assert status == 0, err
    assert "boot: linux entry long64 rip=0x1000000 " in err
    assert f"boot: setup_data at {layout.SETUP_DATA.base:#x} (RNG seed)" in err


def test_bzimage_with_boot_pvh_is_a_user_error(tmp_path: Path) -> None:
    status, out, err = run("--kernel", kernel(tmp_path, "k", smoke_bzimage(b"x")), "--boot", "pvh")
    assert status == 2 and out == ""
    assert err.strip().splitlines() == [f"minivmm: error: kernel {tmp_path / 'k'}: a bzImage has no PVH entry; boot it with --boot linux"]


def test_bzimage_entry_is_64_bit(tmp_path: Path) -> None:
    """The same bytes run in 32- and 64-bit mode, so check the mode via --trace."""
    status, out, err = run("--kernel", kernel(tmp_path, "k", make_bzimage(bytes(0x200) + smoke_code(b"x"))), "--trace")
    assert status == 0, err
    assert "boot: bzimage entry long64" in err
