"""INTx fallback of the virtio-pci transport (virtio 1.2 §4.1.4.5, PCI 3.0 §6.2.3-6.2.4, §2.2.6):
the pin, its GSI (the DSDT's _PRT swizzle), the level against ISR read-to-clear, MSI-X enable
and PCI_COMMAND_INTX_DISABLE, and wired-OR sharing of a GSI; driven through conf1 and the MMIO
bus of a real host bridge, with a fake line that records levels."""

from __future__ import annotations

import pytest
from test_virtio_pci import MB, Driver, FakeDevice, activate, enable_msix

from minivmm import layout
from minivmm.allocator import AddressAllocator
from minivmm.bus import Bus
from minivmm.devices.virtio.pci import ISR_CFG_OFFSET, VirtioPciDevice
from minivmm.memory import GuestMemory
from support.fakes import FakeInterruptController, FakeIoEventRegistry, GuestConf1
from minivmm.pci.host import PciHostBridge
from minivmm.pci.pci_regs import (
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_INTERRUPT_PIN,
    PCI_MSIX_FLAGS,
    PCI_STATUS,
    PCI_STATUS_INTERRUPT,
)
from minivmm.ranges import AddressRange


class Board:
    """A host bridge on real buses with virtio functions in chosen slots."""

    def __init__(self, slots: list[int]) -> None:
        self.mmio, pio = Bus("mmio"), Bus("pio")
        w32, w64 = AddressRange(0xC000_0000, 0x3EC0_0000), AddressRange(1 << 32, 1 << 32)
        self.ic = FakeInterruptController()
        self.bridge = PciHostBridge(
            self.mmio, FakeIoEventRegistry(), AddressAllocator("w32", w32), AddressAllocator("w64", w64), intx=self.ic
        )
        pio.register(layout.PCI_CONFIG_ADDRESS_PORT, layout.PCI_CONFIG_PORT_COUNT, self.bridge.conf1, "pci-conf1")
        self.g = GuestConf1(pio)
        self.mem = GuestMemory.anonymous(4 * MB)
        self.t: dict[int, VirtioPciDevice] = {}
        for slot in slots:
            t = VirtioPciDevice(FakeDevice(), self.mem, self.ic)
            assert self.bridge.add_device(t, slot) == slot
            self.t[slot] = t

    def line(self, slot: int):
        return self.ic.lines[layout.pci_intx_gsi(slot, 0)]

    def isr(self, slot: int) -> int:
        t = self.t[slot]
        return self.mmio.read(t.config.bar_address(0) + ISR_CFG_OFFSET, 1)[0]

    def status_int(self, slot: int) -> bool:
        return bool(self.g.read(slot, PCI_STATUS, 2) & PCI_STATUS_INTERRUPT)

    def close(self) -> None:
        for t in self.t.values():
            t.close()


@pytest.fixture
def board():
    b = Board([3])
    yield b
    b.close()


def bring_up_without_msix(t: VirtioPciDevice) -> Driver:
    """Like vp_find_vqs_intx: no MSI-X, vectors left at NO_VECTOR."""
    d = Driver(t)
    d.negotiate(1 << 32)
    d.setup_queue(0, 16, 0x1000, 0x2000, 0x3000, vector=0xFFFF)
    d.write("device_status", d.read("device_status") | 4)  # DRIVER_OK
    return d


def test_pin_and_gsi_follow_the_prt(board):
    assert board.g.read(3, PCI_INTERRUPT_PIN, 1) == 1  # INTA#
    gsi = layout.pci_intx_gsi(3, 0)  # the _PRT entry for slot 3 pin 0 (checked in test_acpi)
    assert board.bridge.intx_gsi(3) == gsi and 16 <= gsi < 24
    assert set(board.ic.lines) == {gsi}
    assert board.line(3).history == []  # wired low


def test_queue_interrupt_asserts_until_isr_read(board):
    t = board.t[3]
    bring_up_without_msix(t)
    line = board.line(3)
    assert not line.level and not board.status_int(3)
    t.signal_used(0)
    assert line.level and board.status_int(3)
    t.signal_used(0)  # still one level, not a second edge
    assert line.history == [True]
    assert board.isr(3) == 1  # read-to-clear ...
    assert not line.level and not board.status_int(3)  # ... deasserts
    assert board.isr(3) == 0
    assert line.history == [True, False]


def test_config_interrupt_uses_the_pin_too(board):
    t = board.t[3]
    bring_up_without_msix(t)
    t.config_changed()
    assert board.line(3).level
    assert board.isr(3) == 2 and not board.line(3).level


def test_interrupt_disable_masks_the_pin_not_the_status(board):
    t = board.t[3]
    bring_up_without_msix(t)
    cmd = board.g.read(3, PCI_COMMAND, 2)
    board.g.write(3, PCI_COMMAND, 2, cmd | PCI_COMMAND_INTX_DISABLE)
    t.signal_used(0)
    assert not board.line(3).level and board.status_int(3)  # PCI 3.0 §6.2.3
    board.g.write(3, PCI_COMMAND, 2, cmd)  # re-enabled with ISR still set: asserts now
    assert board.line(3).level
    board.g.write(3, PCI_COMMAND, 2, cmd | PCI_COMMAND_INTX_DISABLE)
    assert not board.line(3).level
    assert board.isr(3) == 1 and not board.status_int(3)


def test_msix_enabled_means_no_intx(board):
    t = board.t[3]
    d = Driver(t)
    activate(t, d)  # MSI-X enabled, queue on vector 1
    board.g.write(3, PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
    t.signal_used(0)
    assert board.ic.routes[1].delivered and board.line(3).history == []
    assert not board.status_int(3)
    # MSI-X switched off (pci_disable_msix) with ISR still set: the pin takes over
    board.g.write(3, t.msix.cap_offset + PCI_MSIX_FLAGS, 2, 0)
    assert board.line(3).level and board.status_int(3)
    board.isr(3)
    assert not board.line(3).level


def test_without_msix_no_msi_message_is_sent(board):
    t = board.t[3]
    enable_msix(t)  # table programmed, then MSI-X disabled again: vectors must stay silent
    board.g.write(3, t.msix.cap_offset + PCI_MSIX_FLAGS, 2, 0)
    d = Driver(t)
    d.negotiate(1 << 32)
    d.setup_queue(0, 16, 0x1000, 0x2000, 0x3000, vector=1)
    d.write("device_status", d.read("device_status") | 4)
    t.signal_used(0)
    assert board.line(3).level
    assert all(not r.delivered and not r.pending() for r in board.ic.routes)


def test_reset_deasserts(board):
    t = board.t[3]
    d = bring_up_without_msix(t)
    t.signal_used(0)
    assert board.line(3).level
    d.write("device_status", 0)
    assert d.read("device_status") == 0
    assert not board.line(3).level and not board.status_int(3)


def test_shared_gsi_is_a_wired_or():
    """Slots 1 and 9 share GSI 17 (the swizzle repeats every 8 slots): the line stays asserted
    while either function asserts."""
    b = Board([1, 9, 2])
    try:
        assert layout.pci_intx_gsi(1, 0) == layout.pci_intx_gsi(9, 0) != layout.pci_intx_gsi(2, 0)
        for slot in (1, 9, 2):
            bring_up_without_msix(b.t[slot])
        shared = b.line(1)
        b.t[1].signal_used(0)
        b.t[9].signal_used(0)
        assert shared.level and not b.line(2).level
        b.isr(1)
        assert shared.level  # slot 9 still asserts
        b.isr(9)
        assert not shared.level
        assert shared.history == [True, False]
        b.t[2].signal_used(0)
        assert b.line(2).level and not shared.level
        b.t[9].signal_used(0)
        b.bridge.remove_device(9)  # unplugged while asserting: it no longer holds the wire
        assert not shared.level
    finally:
        b.close()


def test_no_intx_routing_without_a_controller():
    """A bridge built without `intx` connects no pin (the function still reports INTA#)."""
    mmio = Bus("mmio")
    bridge = PciHostBridge(mmio, FakeIoEventRegistry(), AddressAllocator("w32", AddressRange(0xC000_0000, 0x1000_0000)))
    t = VirtioPciDevice(FakeDevice(), GuestMemory.anonymous(MB), FakeInterruptController())
    slot = bridge.add_device(t)
    assert bridge.intx_gsi(slot) is None
    t.signal_used(0)  # no line: nothing to drive, nothing raised
    t.close()

