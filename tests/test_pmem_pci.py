"""virtio-pmem behind the virtio-pci transport on a real backing file: what the guest sees
through BAR 0 while the device's flusher thread works (issue 9 item 6: reset off the vCPU)."""

from __future__ import annotations

import os
import threading
import time

import pytest
from test_pmem import AVAIL, DESC, QSIZE, RAM, TIMEOUT, USED, LinuxLikeDriver
from test_virtio_pci import Driver, activate

from minivmm.devices.virtio.pci import ISR_CFG_OFFSET, NOTIFY_CFG_OFFSET, VirtioPciDevice
from minivmm.devices.virtio.pmem import VirtioPmem
from minivmm.memory import GuestMemory
from support.fakes import FakeInterruptController
from minivmm.pmemfile import PmemSpec, open_backing


class RecordingMemory(GuestMemory):
    """Guest memory that logs (time, thread) of every access made by a thread other than the test's."""

    def __init__(self) -> None:
        super().__init__()
        self.device_accesses: list[tuple[float, str]] = []
        self._main = threading.current_thread()

    def view(self, gpa: int, length: int) -> memoryview:
        self._log()
        return super().view(gpa, length)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._log()
        super().write(gpa, data)

    def _log(self) -> None:
        if threading.current_thread() is not self._main:
            self.device_accesses.append((time.monotonic(), threading.current_thread().name))


@pytest.fixture
def pci_pmem(tmp_path):
    backing = open_backing(PmemSpec(str(tmp_path / "disk.img"), size=2 << 20))
    ram = GuestMemory.anonymous(0x100000, gpa=RAM)
    mem = RecordingMemory()
    mem.add_region(ram.regions[0])
    ic = FakeInterruptController()
    dev = VirtioPmem.from_backing(backing, start=0x1_0000_0000)
    t = VirtioPciDevice(dev, mem, ic)
    yield t, dev, mem, ic, backing
    t.close()
    backing.close()
    assert dev.errors == []


def test_reset_during_a_slow_flush_returns_at_once(pci_pmem, monkeypatch) -> None:
    """device_status := 0 while fdatasync blocks: the write returns at once, status reads
    non-zero until the flush is released and the flusher has stopped, then 0; after that read
    the device makes no guest-memory access and no interrupt."""
    t, dev, mem, ic, backing = pci_pmem
    real = os.fdatasync
    entered, release = threading.Event(), threading.Event()

    def blocking(fd: int) -> None:
        if fd == backing.fd:
            entered.set()
            assert release.wait(TIMEOUT)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", blocking)
    d = Driver(t)
    activate(t, d, size=QSIZE, desc=DESC, driver=AVAIL, device=USED)
    guest = LinuxLikeDriver(mem)
    guest.add()
    t.router.write(NOTIFY_CFG_OFFSET, 2, 0)  # a notify that no ioeventfd caught
    assert entered.wait(TIMEOUT)
    flusher = dev._flusher
    assert flusher is not None and flusher.thread.is_alive()

    t0 = time.monotonic()
    d.write("device_status", 0)
    assert time.monotonic() - t0 < 0.5, "the status write waited for the flush"
    assert t.ioeventfds() == ()  # guest notifies no longer reach the stopping device
    for _ in range(20):  # the flush is still blocked: the reset cannot have finished
        assert d.read("device_status") != 0
        d.write("device_status", 0xF)  # ignored while the reset is under way (2.4)
    assert flusher.thread.is_alive() and guest.used_idx() == 0

    release.set()
    deadline = time.monotonic() + TIMEOUT
    while d.read("device_status") != 0:
        assert time.monotonic() < deadline, "device_status never read 0"
        time.sleep(0.001)
    read_zero = time.monotonic()
    assert not flusher.thread.is_alive()  # so nothing can follow: the proof, not a sleep
    assert mem.device_accesses and all(when < read_zero for when, _ in mem.device_accesses)
    delivered = [list(r.delivered) for r in ic.routes]
    assert t.router.read(ISR_CFG_OFFSET, 1) == 0
    # the register file is back at its reset values and the device can be brought up again
    assert d.read("queue_enable") == 0 and d.read("config_msix_vector") == 0xFFFF
    assert [list(r.delivered) for r in ic.routes] == delivered


def test_reset_of_an_idle_device_reads_zero_at_once(pci_pmem) -> None:
    t, dev, mem, ic, backing = pci_pmem
    d = Driver(t)
    activate(t, d, size=QSIZE, desc=DESC, driver=AVAIL, device=USED)
    assert dev.active
    d.write("device_status", 0)
    deadline = time.monotonic() + TIMEOUT
    while d.read("device_status") != 0:  # the idle flusher exits as soon as it sees the stop pipe
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert not dev.active and dev.reset_done()
    # and it comes back: a flush after re-initialisation completes
    mem.write(RAM, bytes(0x20000))
    activate(t, d, size=QSIZE, desc=DESC, driver=AVAIL, device=USED)
    guest = LinuxLikeDriver(mem)
    head = guest.add()
    t.router.write(NOTIFY_CFG_OFFSET, 2, 0)
    guest.wait_used(1)
    assert guest.ret(head) == 0
