"""Interactive use of the default guest through a pseudo-terminal: the busybox /init gives a
shell on the console, typed commands run (fork+exec+wait in the guest) and their output
comes back, and `poweroff` typed in the shell ends minivmm with status 0 and restores the
terminal. Boots the real default guest on real KVM (minutes on a software-KVM host)."""

from __future__ import annotations

import os
import re
import select
import termios
import time
from pathlib import Path

import pytest
from support.runner import Minivmm, start_minivmm

BOOT_TIMEOUT = 900.0
PCI_COUNT = re.compile(rb"pci-(\d+)\s")  # the output of `echo pci-$#`, not its echo
# Counted with shell builtins: a pipe (ls | wc) hits the kvm_pvm start-up crash of two
# programs started together (README, "Running on software-KVM hosts").


class Pty:
    """The host side of a terminal that minivmm uses as its stdin/stdout."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.output = b""
        self.vmm: Minivmm | None = None

    def expect(self, needle: bytes | re.Pattern[bytes], timeout: float) -> bytes:
        """Read until `needle` (bytes, or a regex to search for) is in the output; the output."""
        found = needle.search if isinstance(needle, re.Pattern) else lambda output: needle in output
        deadline = time.monotonic() + timeout
        while not found(self.output):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {needle!r} after {timeout:.0f} s; output tail:\n{self.output[-3000:].decode(errors='replace')}")
            if self.vmm is not None and self.vmm.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(
                    f"minivmm exited ({self.vmm.proc.returncode}) before {needle!r}; output tail:\n{self.output[-3000:].decode(errors='replace')}"
                )
            if select.select([self.master], [], [], min(left, 1.0))[0]:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:  # EIO: every slave fd closed
                    raise AssertionError(f"terminal closed before {needle!r}:\n{self.output[-3000:].decode(errors='replace')}")
        return self.output

    def drain(self) -> bytes:
        """Everything minivmm wrote, once it has exited: closes our slave fd, the last one, and
        reads to the master's EIO, which Linux returns only after the buffered output."""
        assert self.vmm is not None and self.vmm.proc.poll() is not None
        os.close(self.slave)
        self.slave = -1
        while True:
            if not select.select([self.master], [], [], 60)[0]:
                raise AssertionError("the terminal neither delivered nor ended its output in 60 s")
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: no slave fd left and nothing buffered
                return self.output
            if not chunk:
                return self.output
            self.output += chunk

    def type(self, text: bytes) -> None:
        for byte in text:  # at typing speed: the guest's UART has a 16-byte FIFO
            os.write(self.master, bytes([byte]))
            time.sleep(0.01)

    def close(self) -> None:
        os.close(self.master)
        if self.slave >= 0:
            os.close(self.slave)


@pytest.mark.boot
def test_interactive_shell_runs_commands_and_poweroff_ends_the_run(guest, tmp_path: Path) -> None:
    pty = Pty()
    before = termios.tcgetattr(pty.slave)
    vmm = pty.vmm = start_minivmm(["--cmdline", "console=ttyS0 quiet panic=-1 reboot=k"], tmp_path, stdin=pty.slave, stdout=pty.slave)
    run = None
    try:
        pty.expect(b"minivmm: starting shell", BOOT_TIMEOUT)
        pty.expect(b"# ", 120)  # the busybox prompt
        assert not termios.tcgetattr(pty.slave)[3] & termios.ICANON  # raw while the guest runs
        pty.type(b"echo shell-$((6*7)); uname -m; set -- /sys/bus/pci/devices/*; echo pci-$#\r")
        out = pty.expect(b"shell-42", 120)
        pty.expect(b"x86_64", 60)
        pci = PCI_COUNT.search(pty.expect(PCI_COUNT, 60))
        assert pci and pci.group(1) == b"1", pci  # the host bridge 00:00.0 alone (no --pmem)
        pty.type(b"poweroff\r")
        run = vmm.wait(timeout=300)
    finally:
        if run is None:
            vmm.kill()
        after = termios.tcgetattr(pty.slave)
        try:
            out = pty.drain()
        finally:
            pty.close()
    assert run.status == 0 and not run.timed_out, run.describe() + out.decode(errors="replace")[-3000:]
    assert "powered off" in run.stderr.strip().splitlines()[-1]
    assert run.stop_reason == "guest powered off (ACPI S5)", run.describe()
    assert b"shell-42" in out
    # /init prints each of its lines once (guest/init.sh log()), not once per kernel log and tty.
    for line in (b"minivmm: init started", b"minivmm: starting shell", b"minivmm: powering off"):
        assert out.count(line) == 1, (line, out.decode(errors="replace")[-3000:])
    assert after == before  # the terminal is restored
    assert "Traceback" not in run.stderr
