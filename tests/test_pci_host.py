"""Host bridge: configuration mechanism #1, BAR pre-assignment and BAR/ioeventfd mapping."""

from __future__ import annotations

import pytest

from minivmm.bus import Bus
from minivmm.pci.config import PciConfigSpace
from minivmm.pci.device import IoEventFd, PciDevice
from support.fakes import FakeIoEventRegistry, GuestConf1
from minivmm import layout
from minivmm.allocator import AddressAllocator
from minivmm.errors import UserError
from minivmm.pci.host import PciHostBridge
from minivmm.ranges import AddressRange
from minivmm.pci.pci_regs import (
    PCI_BASE_ADDRESS_0,
    PCI_CACHE_LINE_SIZE,
    PCI_CLASS_DEVICE,
    PCI_COMMAND,
    PCI_COMMAND_MEMORY,
    PCI_HEADER_TYPE,
    PCI_INTERRUPT_LINE,
    PCI_VENDOR_ID,
)

WIN32 = AddressRange(0xC000_0000, 0xFEC0_0000 - 0xC000_0000)
WIN64 = AddressRange(0x1_0000_0000, 0x1_0000_0000)


def make_bridge(mmio: Bus, ioevents, w32: AddressRange, w64: AddressRange | None = None, pio: Bus | None = None) -> PciHostBridge:
    """A bridge allocating BARs in fresh windows, with conf1 on `pio` as the machine puts it."""
    bridge = PciHostBridge(mmio, ioevents, AddressAllocator("w32", w32), AddressAllocator("w64", w64) if w64 else None)
    if pio is not None:
        pio.register(layout.PCI_CONFIG_ADDRESS_PORT, layout.PCI_CONFIG_PORT_COUNT, bridge.conf1, "pci-conf1")
    return bridge


class Regs:
    """A BAR handler remembering what it saw."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return 0xA5A5_0000 | offset

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


class Dev(PciDevice):
    def __init__(self) -> None:
        super().__init__(PciConfigSpace(vendor_id=0x1234, device_id=0x5678, class_code=0xFF0000), "dev")
        self.h0, self.h2 = Regs(), Regs()
        self.add_bar(0, 0x4000, self.h0, mem64=True)
        self.add_bar(2, 0x1000, self.h2, mem64=False)
        self.events: tuple[IoEventFd, ...] = (IoEventFd(0, 0x3000, 2, 77), IoEventFd(2, 0x10, 4, 78, datamatch=5))

    def ioeventfds(self):
        return self.events


@pytest.fixture
def setup():
    mmio, pio = Bus("mmio"), Bus("pio")
    reg = FakeIoEventRegistry()
    bridge = make_bridge(mmio, reg, WIN32, WIN64, pio)
    return bridge, mmio, pio, reg, GuestConf1(pio)


def test_conf1_address_register(setup):
    _bridge, _, pio, _, _ = setup
    assert pio.read(0xCF8, 4)[0] == 0
    pio.write(0xCFB, 1, 0x01)  # pci_check_type1's byte write: not CONFIG_ADDRESS
    pio.write(0xCF8, 4, 0x8000_0000)
    assert pio.read(0xCF8, 4)[0] == 0x8000_0000
    pio.write(0xCF8, 4, 0xFFFF_FFFF)
    assert pio.read(0xCF8, 4)[0] == 0x80FF_FFFC  # reserved bits read 0
    assert pio.read(0xCF8, 2)[0] == 0xFFFF  # only dword accesses reach it
    pio.write(0xCF8, 2, 0)
    assert pio.read(0xCF8, 4)[0] == 0x80FF_FFFC


def test_host_bridge_identity(setup):
    _, _, _, _, g = setup
    assert g.read(0, PCI_VENDOR_ID, 4) == 0x0008_1B36
    assert g.read(0, PCI_CLASS_DEVICE, 2) == 0x0600
    assert g.read(0, PCI_HEADER_TYPE, 1) == 0
    assert g.read(0, PCI_BASE_ADDRESS_0, 4) == 0


def test_conf1_every_offset_and_size(setup):
    bridge, _, pio, _, _ = setup
    dev = Dev()
    slot = bridge.add_device(dev)
    cfg = dev.config
    for reg in range(0, 0x40, 4):
        for byte in range(4):
            for size in (1, 2, 4):
                if byte + size > 4:
                    continue
                pio.write(0xCF8, 4, 0x8000_0000 | slot << 11 | reg)
                assert pio.read(0xCFC + byte, size)[0] == cfg.read(reg + byte, size), (reg, byte, size)
    # writes at every data port offset land on reg + (port - 0xCFC)
    pio.write(0xCF8, 4, 0x8000_0000 | slot << 11 | PCI_CACHE_LINE_SIZE)
    pio.write(0xCFC, 1, 0x10)
    assert cfg.read(PCI_CACHE_LINE_SIZE, 1) == 0x10
    pio.write(0xCF8, 4, 0x8000_0000 | slot << 11 | PCI_INTERRUPT_LINE)
    pio.write(0xCFC, 1, 0x0A)
    assert cfg.read(PCI_INTERRUPT_LINE, 1) == 0x0A
    pio.write(0xCF8, 4, 0x8000_0000 | slot << 11 | PCI_COMMAND)
    pio.write(0xCFE, 2, 0)  # status: W1C with zero, nothing happens
    pio.write(0xCFD, 1, 0x04)  # command high byte: INTX_DISABLE
    assert cfg.read(PCI_COMMAND, 2) == 0x0400 | PCI_COMMAND_MEMORY


@pytest.mark.parametrize(
    "address",
    [
        0x8000_0000 | 5 << 11,  # empty slot
        0x8001_0000,  # bus 1
        0x8000_0100 | 1 << 11,  # function 1 of a present device
        0x0000_0000 | 1 << 11,  # enable bit clear
    ],
)
def test_conf1_absent_reads_all_ones(setup, address):
    bridge, _, pio, _, _ = setup
    bridge.add_device(Dev())
    for byte in range(4):
        for size in (1, 2, 4):
            if byte + size <= 4:
                pio.write(0xCF8, 4, address)
                assert pio.read(0xCFC + byte, size)[0] == (1 << (8 * size)) - 1
    pio.write(0xCF8, 4, address | PCI_COMMAND)
    pio.write(0xCFC, 2, 0xFFFF)  # dropped


def test_preassigned_bars_and_mapping(setup):
    bridge, mmio, _, reg, g = setup
    dev = Dev()
    slot = bridge.add_device(dev)
    assert slot == 1
    assert dev.config.bar_address(0) == WIN64.base  # 64-bit BAR in the 64-bit window
    assert dev.config.bar_address(2) == WIN32.base  # 32-bit BAR below 4 GiB
    assert g.read(slot, PCI_COMMAND, 2) & PCI_COMMAND_MEMORY
    assert bridge.mapped_bars == {(1, 0): WIN64.base, (1, 2): WIN32.base}
    assert mmio.read(WIN64.base + 0x10, 4) == (0xA5A5_0010, mmio.lookup(WIN64.base))
    mmio.write(WIN32.base + 8, 4, 0x1234)
    assert dev.h2.writes == [(8, 4, 0x1234)]
    assert reg.active == {(WIN64.base + 0x3000, 2, 77, None), (WIN32.base + 0x10, 4, 78, 5)}


def test_linux_bar_sizing_keeps_mapping(setup):
    bridge, _mmio, _, reg, g = setup
    dev = Dev()
    slot = bridge.add_device(dev)
    before = (bridge.mapped_bars, set(reg.active))
    assert g.size_bar(slot, 0) == (WIN64.base, 0x4000, 0x4)
    assert g.size_bar(slot, 2) == (WIN32.base, 0x1000, 0x0)
    assert g.size_bar(slot, 4) == (0, 0, 0)  # unimplemented slot
    assert (bridge.mapped_bars, set(reg.active)) == before
    assert sum(bridge.warnings.values()) == 0


def test_sizing_with_decoding_left_on_is_silent(setup):
    bridge, _mmio, _, _reg, g = setup
    dev = Dev()
    slot = bridge.add_device(dev)
    g.write(slot, PCI_BASE_ADDRESS_0 + 8, 4, 0xFFFF_FFFF)  # like mmio_always_on: decoding stays on
    assert (slot, 2) not in bridge.mapped_bars
    g.write(slot, PCI_BASE_ADDRESS_0 + 8, 4, WIN32.base)
    assert bridge.mapped_bars[(slot, 2)] == WIN32.base
    assert sum(bridge.warnings.values()) == 0


def test_bar_move_and_memory_toggle(setup):
    bridge, mmio, _, reg, g = setup
    dev = Dev()
    slot = bridge.add_device(dev)
    new = WIN32.base + 0x10_0000
    # Linux's pci_std_update_resource: lower dword, then upper dword
    g.write(slot, PCI_BASE_ADDRESS_0, 4, new)
    assert bridge.mapped_bars[(slot, 0)] == WIN64.base  # half-written: not moved yet
    g.write(slot, PCI_BASE_ADDRESS_0 + 4, 4, 0)
    assert bridge.mapped_bars[(slot, 0)] == new
    assert mmio.lookup(WIN64.base) is None
    assert mmio.read(new, 4)[0] == 0xA5A5_0000
    assert (new + 0x3000, 2, 77, None) in reg.active
    assert (WIN64.base + 0x3000, 2, 77, None) not in reg.active
    # memory decoding off: both BARs and all ioeventfds go away
    cmd = g.read(slot, PCI_COMMAND, 2)
    g.write(slot, PCI_COMMAND, 2, cmd & ~PCI_COMMAND_MEMORY)
    assert bridge.mapped_bars == {}
    assert reg.active == set()
    assert mmio.read(new, 4)[0] == 0xFFFF_FFFF
    g.write(slot, PCI_COMMAND, 2, cmd)
    assert bridge.mapped_bars == {(slot, 0): new, (slot, 2): WIN32.base}
    assert len(reg.active) == 2
    # a changed ioeventfd list is picked up when the device says so
    dev.events = dev.events[:1]
    dev.mapping_changed()
    assert reg.active == {(new + 0x3000, 2, 77, None)}


def test_overlap_and_outside_window_are_warnings(setup):
    bridge, mmio, _, reg, g = setup
    a, b = Dev(), Dev()
    sa, _sb = bridge.add_device(a), bridge.add_device(b)
    b2 = b.config.bar_address(2)
    # put a's 32-bit BAR on top of b's
    g.write(sa, PCI_BASE_ADDRESS_0 + 8, 4, b2)
    assert (sa, 2) not in bridge.mapped_bars
    assert bridge.warnings["bar-overlap"] == 1
    assert mmio.lookup(b2).device is b.h2
    assert (b2 + 0x10, 4, 78, 5) in reg.active and len([e for e in reg.active if e[2] == 78]) == 1
    # repeated reconciliation does not recount the same placement
    g.write(sa, PCI_COMMAND, 2, g.read(sa, PCI_COMMAND, 2))
    a.mapping_changed()
    assert bridge.warnings["bar-overlap"] == 1
    # outside both windows (e.g. in RAM)
    g.write(sa, PCI_BASE_ADDRESS_0 + 8, 4, 0x0010_0000)
    assert bridge.warnings["bar-outside-window"] == 1
    assert (sa, 2) not in bridge.mapped_bars
    # moving it somewhere free maps it again
    g.write(sa, PCI_BASE_ADDRESS_0 + 8, 4, WIN32.base + 0x80_0000)
    assert bridge.mapped_bars[(sa, 2)] == WIN32.base + 0x80_0000


def test_slots_and_windows():
    mmio = Bus("mmio")
    bridge = make_bridge(mmio, FakeIoEventRegistry(), AddressRange(0xC000_0000, 0x10000))
    assert bridge.add_device(Dev(), slot=7) == 7
    assert bridge.add_device(Dev()) == 1
    assert bridge.add_device(Dev()) == 2
    # without a 64-bit window the 64-bit BARs go below 4 GiB: first fit, naturally aligned
    assert sorted(bridge.mapped_bars.values()) == [
        0xC000_0000, 0xC000_4000, 0xC000_5000, 0xC000_6000, 0xC000_8000, 0xC000_C000
    ]
    with pytest.raises(UserError, match="^dev BAR0: no room for 16K in w32"):
        bridge.add_device(Dev())  # window exhausted
    assert len(bridge.mapped_bars) == 6  # the refused device took nothing
    with pytest.raises(UserError, match="PCI slot 7 is not free"):
        bridge.add_device(Dev(), slot=7)
    with pytest.raises(UserError, match="PCI slot 0 is not free"):
        bridge.add_device(Dev(), slot=0)
    with pytest.raises(ValueError):
        make_bridge(mmio, FakeIoEventRegistry(), AddressRange(0xFFFF_0000, 0x20000))
    bridge.remove_device(7)
    assert all(s != 7 for s, _ in bridge.mapped_bars)
    assert mmio.lookup(0xC000_0000) is None


def test_linux_scan_finds_devices(setup):
    bridge, _, _, _, g = setup
    bridge.add_device(Dev(), slot=3)
    found = [d for d in range(32) if g.read(d, PCI_VENDOR_ID, 4) != 0xFFFF_FFFF]
    assert found == [0, 3]


def test_removed_device_frees_its_window_space():
    bridge = make_bridge(Bus("mmio"), FakeIoEventRegistry(), AddressRange(0xC000_0000, 0x8000))
    a = bridge.add_device(Dev())
    with pytest.raises(UserError):
        bridge.add_device(Dev())
    bridge.remove_device(a)
    bridge.add_device(Dev())
    assert sorted(bridge.mapped_bars.values()) == [0xC000_0000, 0xC000_4000]


def test_linux_pci_check_type1(setup):
    """arch/x86/pci/direct.c: pci_check_type1 + pci_sanity_check (no DMI date: the scan runs)."""
    _, _, pio, _, g = setup
    pio.write(0xCFB, 1, 0x01)
    tmp = pio.read(0xCF8, 4)[0]
    pio.write(0xCF8, 4, 0x8000_0000)
    assert pio.read(0xCF8, 4)[0] == 0x8000_0000
    sane = False
    for devfn in range(0x100):
        dev, fn = devfn >> 3, devfn & 7
        if g.read(dev, PCI_CLASS_DEVICE, 2, fn=fn) in (0x0600, 0x0300):
            sane = True
            break
    assert sane
    pio.write(0xCF8, 4, tmp)
    assert pio.read(0xCF8, 4)[0] == tmp


def test_a_full_bus_is_a_user_error():
    bridge = make_bridge(Bus("mmio"), FakeIoEventRegistry(), WIN32, WIN64)
    for _ in range(31):
        bridge.add_device(Dev())
    with pytest.raises(UserError, match="^dev: PCI bus 0 is full \\(at most 31 devices\\)$"):
        bridge.add_device(Dev())
