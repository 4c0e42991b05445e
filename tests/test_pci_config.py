"""Type-0 configuration space: masks, W1C status, BARs and their sizing, capabilities."""

from __future__ import annotations

import pytest

from minivmm.pci.config import PciConfigSpace
from minivmm.pci.pci_regs import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_VNDR,
    PCI_CAPABILITY_LIST,
    PCI_CLASS_REVISION,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_DEVICE_ID,
    PCI_INTERRUPT_LINE,
    PCI_ROM_ADDRESS,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_STATUS_DETECTED_PARITY,
    PCI_STATUS_REC_MASTER_ABORT,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
)


def make() -> PciConfigSpace:
    return PciConfigSpace(
        vendor_id=0x1AF4,
        device_id=0x105B,
        class_code=0xFF0000,
        revision_id=1,
        subsystem_vendor_id=0x1AF4,
        subsystem_id=0x40,
    )


def test_identification_fields_read_only():
    c = make()
    before = bytes(c.read(i, 1) for i in range(0x40))
    assert c.read(PCI_VENDOR_ID, 4) == 0x105B_1AF4
    assert c.read(PCI_CLASS_REVISION, 4) == 0xFF00_0001
    assert c.read(PCI_SUBSYSTEM_VENDOR_ID, 4) == 0x0040_1AF4
    for off in (PCI_VENDOR_ID, PCI_CLASS_REVISION, PCI_SUBSYSTEM_VENDOR_ID, PCI_ROM_ADDRESS):
        c.write(off, 4, 0xFFFF_FFFF)
        c.write(off, 1, 0)
    c.write(PCI_DEVICE_ID, 2, 0)
    after = bytes(c.read(i, 1) for i in range(0x40))
    assert after == before


def test_every_size_and_unaligned_offset():
    c = make()
    raw = bytes(c.read(i, 1) for i in range(8))
    for off in range(6):
        assert c.read(off, 2) == int.from_bytes(raw[off : off + 2], "little")
    for off in range(5):
        assert c.read(off, 4) == int.from_bytes(raw[off : off + 4], "little")
    # an unaligned 4-byte write straddling command/status dwords is split byte by byte
    c.write(PCI_INTERRUPT_LINE - 1, 2, 0x0B00)
    assert c.read(PCI_INTERRUPT_LINE, 1) == 0x0B
    # out-of-range or odd-size accesses are ignored / read all-ones
    assert c.read(255, 2) == 0xFFFF
    assert c.read(0, 3) == 0xFFFFFF
    c.write(254, 4, 0)


def test_command_writable_bits_only():
    c = make()
    c.write(PCI_COMMAND, 2, 0xFFFF)
    assert c.read(PCI_COMMAND, 2) == 0x0546  # MEMORY|MASTER|PARITY|SERR|INTX_DISABLE; no I/O
    c.write(PCI_COMMAND, 2, 0)
    assert c.read(PCI_COMMAND, 2) == 0


def test_status_write_one_to_clear():
    c = make()
    c.set(PCI_STATUS, 2, PCI_STATUS_DETECTED_PARITY | PCI_STATUS_REC_MASTER_ABORT | PCI_STATUS_CAP_LIST)
    c.write(PCI_STATUS, 2, 0)  # writing 0 changes nothing
    assert c.read(PCI_STATUS, 2) == PCI_STATUS_DETECTED_PARITY | PCI_STATUS_REC_MASTER_ABORT | PCI_STATUS_CAP_LIST
    c.write(PCI_STATUS, 2, PCI_STATUS_REC_MASTER_ABORT | PCI_STATUS_CAP_LIST)
    assert c.read(PCI_STATUS, 2) == PCI_STATUS_DETECTED_PARITY | PCI_STATUS_CAP_LIST  # CAP_LIST is RO
    # a dword write to command also hits status: only 1 bits clear
    c.write(PCI_COMMAND, 4, PCI_STATUS_DETECTED_PARITY << 16 | PCI_COMMAND_MASTER)
    assert c.read(PCI_STATUS, 2) == PCI_STATUS_CAP_LIST
    assert c.read(PCI_COMMAND, 2) == PCI_COMMAND_MASTER


def test_bar32_sizing():
    c = make()
    c.add_bar(2, 0x1000, mem64=False)
    reg = PCI_BASE_ADDRESS_0 + 8
    c.write(reg, 4, 0xFFFF_FFFF)
    assert c.read(reg, 4) == 0xFFFF_F000
    c.write(reg, 4, 0xC000_1234)
    assert c.read(reg, 4) == 0xC000_1000
    assert c.bar_address(2) == 0xC000_1000
    # unused BAR slots read 0 and stay 0
    c.write(PCI_BASE_ADDRESS_0, 4, 0xFFFF_FFFF)
    assert c.read(PCI_BASE_ADDRESS_0, 4) == 0


def test_bar64_sizing_and_flags():
    c = make()
    c.add_bar(0, 0x8000, mem64=True, prefetchable=True)
    flags = PCI_BASE_ADDRESS_MEM_TYPE_64 | PCI_BASE_ADDRESS_MEM_PREFETCH
    assert c.read(PCI_BASE_ADDRESS_0, 4) == flags
    c.write(PCI_BASE_ADDRESS_0, 4, 0xFFFF_FFFF)
    c.write(PCI_BASE_ADDRESS_0 + 4, 4, 0xFFFF_FFFF)
    assert c.read(PCI_BASE_ADDRESS_0, 4) == 0xFFFF_8000 | flags
    assert c.read(PCI_BASE_ADDRESS_0 + 4, 4) == 0xFFFF_FFFF
    # a BAR larger than 4 GiB masks its upper dword too
    c2 = make()
    c2.add_bar(4, 1 << 34, mem64=True)
    c2.write(PCI_BASE_ADDRESS_0 + 16, 4, 0xFFFF_FFFF)
    c2.write(PCI_BASE_ADDRESS_0 + 20, 4, 0xFFFF_FFFF)
    assert c2.read(PCI_BASE_ADDRESS_0 + 16, 4) == PCI_BASE_ADDRESS_MEM_TYPE_64
    assert c2.read(PCI_BASE_ADDRESS_0 + 20, 4) == 0xFFFF_FFFC


def test_bar64_address_commits_on_upper_dword():
    c = make()
    c.add_bar(0, 0x4000)
    calls = []
    c.on_change = lambda: calls.append(c.bar_address(0))
    c.write(PCI_BASE_ADDRESS_0, 4, 0xD000_0000)
    assert c.bar_address(0) == 0 and calls == []  # lower half alone does not move the BAR
    c.write(PCI_BASE_ADDRESS_0 + 4, 4, 0x1)
    assert c.bar_address(0) == 0x1_D000_0000 and calls == [0x1_D000_0000]
    # a lower-half write followed by a command write takes effect then
    c.write(PCI_BASE_ADDRESS_0, 4, 0xE000_0000)
    c.write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    assert c.bar_address(0) == 0x1_E000_0000
    assert calls[-1] == 0x1_E000_0000
    # toggling memory decoding reports; other command bits do not
    n = len(calls)
    c.write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
    assert len(calls) == n
    c.write(PCI_COMMAND, 2, PCI_COMMAND_MASTER)
    assert len(calls) == n + 1


def test_bar_declaration_errors():
    c = make()
    with pytest.raises(ValueError):
        c.add_bar(0, 0x1800)
    with pytest.raises(ValueError):
        c.add_bar(5, 0x1000, mem64=True)
    c.add_bar(0, 0x1000, mem64=True)
    with pytest.raises(ValueError):
        c.add_bar(1, 0x1000, mem64=False)
    with pytest.raises(ValueError):
        c.set_bar_address(0, 0x1800)


def walk(c: PciConfigSpace) -> list[tuple[int, int]]:
    out = []
    assert c.read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST
    pos = c.read(PCI_CAPABILITY_LIST, 1)
    while pos:
        out.append((pos, c.read(pos, 1)))
        pos = c.read(pos + 1, 1)
    return out


def test_capability_list_and_masks():
    c = make()
    assert not c.read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST
    assert c.read(PCI_CAPABILITY_LIST, 1) == 0
    a = c.add_capability(PCI_CAP_ID_VNDR, bytes([0, 0, 7, 1, 2, 3, 4]))  # 7 bytes: next is padded
    writes = []
    b = c.add_capability(
        PCI_CAP_ID_MSIX,
        bytes(12),
        bytes([0, 0, 0x00, 0xC0] + [0] * 8),
        on_write=lambda off, size: writes.append((off, size)),
    )
    assert (a, b) == (0x40, 0x48)
    assert walk(c) == [(0x40, PCI_CAP_ID_VNDR), (0x48, PCI_CAP_ID_MSIX)]
    assert c.read(a + 2, 4) == 0x0302_0107
    c.write(a, 4, 0xFFFF_FFFF)  # read-only capability: unchanged, chain intact
    assert walk(c) == [(0x40, PCI_CAP_ID_VNDR), (0x48, PCI_CAP_ID_MSIX)]
    c.write(b, 4, 0xFFFF_FFFF)
    assert c.read(b, 4) == 0xC000_0000 | PCI_CAP_ID_MSIX  # next stays 0, only bits 15:14 writable
    assert writes == [(0, 4)]
    with pytest.raises(ValueError):
        c.add_capability(PCI_CAP_ID_VNDR, bytes(200))
