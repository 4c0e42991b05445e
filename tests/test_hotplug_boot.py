"""Hotplug seen by a real guest: one boot of the default guest with `minivmm.script=hotplug`
(guest/scripts/hotplug.sh), the Machine running IN this process on a thread, its console
on a pipe this test reads.

The guest boots with a cold-plugged pmem0 and waits for /dev/pmem1, doing nothing else to
find it. The test then calls `Machine.hotplug_pmem` with a 64 MiB host-made ext4 image
holding a token file: ACPI (GED interrupt, _EVT, Notify on the slot) makes acpiphp scan the
slot, virtio_pmem probes, /dev/pmem1 appears; the guest mounts it, prints the token, writes
an answer, syncs and unmounts, and the host reads the answer back from the image file while
the guest still runs. Then `Machine.power_button()`: /init's watcher of the "Power Button"
input device flushes and powers off, and the run ends with status 0 (ACPI S5).

Every wait is for a console line (or the end of the run), bounded by BOOT_TIMEOUT; a failure
shows the console's tail.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import threading
import time
from pathlib import Path

import pytest
from bootutil import BOOT_TIMEOUT
from pmembootutil import cat_file, make_ext4
from support.runner import tail

from minivmm.exit_handler import Stop
from minivmm.machine import Machine, MachineConfig
from minivmm.pmemfile import PmemSpec, open_backing
from minivmm.vcpu import install_kick_handler

pytestmark = pytest.mark.boot

MiB = 1 << 20
CMDLINE = "console=ttyS0 quiet panic=-1 reboot=k minivmm.script=hotplug minivmm.hotplug=pmem1"
POWER_OFF_TIMEOUT = 120.0  # from the button to the end of the run


class ConsoleReader:
    """Drains the console pipe on a thread (a full pipe would stall the guest's UART)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._chunks: list[bytes] = []
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="test-console", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while data := os.read(self._fd, 65536):
            with self._cond:
                self._chunks.append(data)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return b"".join(self._chunks).decode(errors="replace").replace("\r\n", "\n")

    def wait_for(self, pattern: str, timeout: float, running: threading.Thread) -> re.Match[str]:
        """The first match of `pattern` (a regex) on the console; fails when the run ends
        or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        with self._cond:
            while True:
                match = regex.search(b"".join(self._chunks).decode(errors="replace"))
                if match:
                    return match
                left = deadline - time.monotonic()
                if left <= 0 or not running.is_alive():
                    break
                self._cond.wait(min(left, 1.0))
        pytest.fail(f"no console line /{pattern}/ ({'the run ended' if not running.is_alive() else f'{timeout:g} s'}):\n{tail(self.text)}")


def ext4_with_token(tmp_path: Path, token: str) -> Path:
    """A 64 MiB ext4 image (4 KiB blocks, for DAX) whose root holds `token`."""
    content = tmp_path / "content"
    content.mkdir()
    (content / "token").write_text(f"{token}\n")
    image = tmp_path / "hot.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(content), str(image)], check=True, capture_output=True)
    return image


def test_hotplug_pmem_then_power_button(tmp_path: Path, guest) -> None:
    token = secrets.token_hex(8)
    cold = make_ext4(tmp_path / "cold.img", 64 * MiB)
    hot = ext4_with_token(tmp_path, token)
    console_r, console_w = os.pipe()
    stdin = os.open(os.devnull, os.O_RDONLY)
    config = MachineConfig(
        kernel=guest.vmlinux,
        initrd=guest.initrd,
        cmdline=CMDLINE,
        pmem=[PmemSpec(str(cold), id="cold0")],
        stdin_fd=stdin,
        stdout_fd=console_w,
    )
    install_kick_handler()  # on the main thread: kicks must interrupt KVM_RUN, not kill us
    console = ConsoleReader(console_r)
    result: dict[str, Stop] = {}
    try:
        with Machine(config) as machine:
            runner = threading.Thread(target=lambda: result.update(stop=machine.run()), name="test-machine")
            runner.start()
            try:
                console.wait_for(r"minivmm: power button: /dev/input/event\d+", BOOT_TIMEOUT, runner)
                console.wait_for(r"minivmm: hotplug waiting for /dev/pmem1", BOOT_TIMEOUT, runner)
                assert not re.search(r"/dev/pmem1", console.text.split("waiting for /dev/pmem1", 1)[1])
                backing = open_backing(PmemSpec(str(hot), id="hot0"))
                added_at = time.monotonic()
                device = machine.hotplug_pmem(backing)
                assert device.size == 64 * MiB
                appeared = console.wait_for(r"minivmm: hotplug /dev/pmem1 appeared after \d+ s \((\d+) bytes\)", BOOT_TIMEOUT, runner)
                assert int(appeared.group(1)) == 64 * MiB
                appeared_s = time.monotonic() - added_at
                console.wait_for(r"minivmm: hotplug mounted /dev/pmem1 on /tmp/hotplug", BOOT_TIMEOUT, runner)
                console.wait_for(rf"minivmm: hotplug token={token}\b", BOOT_TIMEOUT, runner)
                console.wait_for(r"minivmm: hotplug unmounted /dev/pmem1", BOOT_TIMEOUT, runner)
                # The guest's write reached the file (read while the guest runs).
                assert cat_file(hot, "/answer") == f"answer {token}\n"
                assert runner.is_alive(), "the guest stopped before the power button"
                machine.power_button()
                console.wait_for(r"minivmm: power button pressed", POWER_OFF_TIMEOUT, runner)
                runner.join(POWER_OFF_TIMEOUT)
                assert not runner.is_alive(), f"no poweroff {POWER_OFF_TIMEOUT:g} s after the power button:\n{tail(console.text)}"
                stats = {p.id: p.counters for p in machine.statistics().pmem}
            finally:
                if runner.is_alive():
                    machine.request_stop(Stop(1, "test failed", "host-error"))
                    runner.join(30)
    finally:
        os.close(console_w)
        os.close(stdin)
    stop = result["stop"]
    assert (stop.status, stop.reason) == (0, "guest powered off (ACPI S5)"), tail(console.text)
    assert "minivmm: hotplug FAILED" not in console.text
    # The hot-added device is a full pmem device: the guest's sync reached it as flushes.
    assert stats["hot0"].flush_requests >= 1, stats
    print(f"device_add -> /dev/pmem1 in the guest: {appeared_s:.1f} s")
