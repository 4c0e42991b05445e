"""MSI-X capability, table and PBA against fake MSI routes."""

from __future__ import annotations

import pytest

from minivmm.pci.config import PciConfigSpace
from support.fakes import FakeInterruptController
from minivmm.pci.msix import MsixTable
from minivmm.pci.pci_regs import (
    PCI_CAP_ID_MSIX,
    PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_MSIX_PBA,
    PCI_MSIX_TABLE,
)

ADDR, DATA = 0xFEE0_1000, 0x4031


@pytest.fixture
def msix():
    ic = FakeInterruptController()
    cfg = PciConfigSpace(vendor_id=1, device_id=2, class_code=0)
    m = MsixTable(3, ic, table_bar=0, table_offset=0x4000, pba_bar=2, pba_offset=0x800)
    cap = m.add_to(cfg)
    return m, cfg, cap, ic.routes


def program(m: MsixTable, i: int, addr: int = ADDR, data: int = DATA) -> None:
    m.table.write(16 * i + 0, 4, addr & 0xFFFF_FFFF)
    m.table.write(16 * i + 4, 4, addr >> 32)
    m.table.write(16 * i + 8, 4, data)


def control(cfg: PciConfigSpace, cap: int, value: int) -> None:
    cfg.write(cap + PCI_MSIX_FLAGS, 2, value)


def test_capability_layout(msix):
    m, cfg, cap, _ = msix
    assert cfg.read(cap, 1) == PCI_CAP_ID_MSIX
    assert cfg.read(cap + PCI_MSIX_FLAGS, 2) == 2  # table size - 1, disabled, unmasked
    assert cfg.read(cap + PCI_MSIX_TABLE, 4) == 0x4000 | 0
    assert cfg.read(cap + PCI_MSIX_PBA, 4) == 0x800 | 2
    cfg.write(cap + PCI_MSIX_FLAGS, 2, 0xFFFF)
    assert cfg.read(cap + PCI_MSIX_FLAGS, 2) == 0xC002  # only enable + function mask stick
    cfg.write(cap + PCI_MSIX_TABLE, 4, 0)
    assert cfg.read(cap + PCI_MSIX_TABLE, 4) == 0x4000
    assert m.table_size == 48 and m.pba_size == 8


def test_table_reset_state_and_masks(msix):
    m, *_ = msix
    for i in range(3):
        assert m.table.read(16 * i + 12, 4) == PCI_MSIX_ENTRY_CTRL_MASKBIT
        assert m.table.read(16 * i, 4) == 0
    m.table.write(0, 4, 0xFFFF_FFFF)
    assert m.table.read(0, 4) == 0xFFFF_FFFC  # address bits 1:0 are 0
    m.table.write(12, 4, 0xFFFF_FFFF)
    assert m.table.read(12, 4) == 1  # reserved vector control bits
    m.table.write(0, 8, 0x1234_5678_9ABC_DEF0)  # a qword access
    assert m.table.read(0, 8) == 0x1234_5678_9ABC_DEF0
    assert m.table.read(48, 4) == 0  # past the table
    assert m.pba.read(0, 8) == 0


def test_linux_enable_sequence_delivers(msix):
    """msix_capability_init: enable+maskall, mask all entries, program, clear maskall, unmask."""
    m, cfg, cap, routes = msix
    control(cfg, cap, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
    for i in range(3):
        m.table.write(16 * i + 12, 4, PCI_MSIX_ENTRY_CTRL_MASKBIT)
        program(m, i, ADDR, DATA + i)
    assert all(r.masked for r in routes)
    assert all(("set_message", ADDR, DATA) not in r.calls for r in routes)  # not programmed while masked
    control(cfg, cap, PCI_MSIX_FLAGS_ENABLE)
    assert all(r.masked for r in routes)  # entries still masked
    m.table.write(16 + 12, 4, 0)  # unmask vector 1 (request_irq)
    assert not routes[1].masked and routes[1].calls[-2:] == [("set_message", ADDR, DATA + 1), ("set_masked", False)]
    m.notify(1)
    assert routes[1].delivered == [(ADDR, DATA + 1)]
    m.notify(0)
    assert routes[0].delivered == [] and routes[0].count == 1


def test_masked_vector_pends_then_delivers_once(msix):
    m, cfg, cap, routes = msix
    control(cfg, cap, PCI_MSIX_FLAGS_ENABLE)
    program(m, 2)
    m.notify(2)
    m.notify(2)
    assert routes[2].delivered == []
    assert m.pba.read(0, 8) == 1 << 2
    assert m.pba.read(0, 1) == 1 << 2
    m.table.write(16 * 2 + 12, 4, 0)  # unmask
    assert routes[2].delivered == [(ADDR, DATA)]  # once, though signalled twice
    assert m.pba.read(0, 8) == 0
    m.notify(2)
    assert routes[2].delivered == [(ADDR, DATA)] * 2
    # eventfd writers (the device hot path) behave like notify()
    assert m.eventfd_of(2) == routes[2].eventfd and m.vector(2) is routes[2]


def test_function_mask_and_enable_bit(msix):
    m, cfg, cap, routes = msix
    program(m, 0)
    m.table.write(12, 4, 0)  # entry unmasked, but MSI-X disabled: still masked
    assert m.masked(0) and routes[0].masked
    m.notify(0)
    assert m.pba.read(0, 4) == 1
    control(cfg, cap, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
    assert routes[0].masked and routes[0].delivered == []
    control(cfg, cap, PCI_MSIX_FLAGS_ENABLE)  # function mask cleared: pending one goes out
    assert not routes[0].masked and routes[0].delivered == [(ADDR, DATA)]
    assert m.pba.read(0, 4) == 0
    control(cfg, cap, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
    m.notify(0)
    assert m.pba.read(0, 4) == 1 and len(routes[0].delivered) == 1
    m.pba.write(0, 4, 0)  # read-only
    assert m.pba.read(0, 4) == 1
    control(cfg, cap, 0)
    assert routes[0].masked
    assert m.pba.read(0, 4) == 1


def test_message_change_while_unmasked_and_reset(msix):
    m, cfg, cap, routes = msix
    control(cfg, cap, PCI_MSIX_FLAGS_ENABLE)
    program(m, 0)
    m.table.write(12, 4, 0)
    m.table.write(8, 4, 0x99)  # undefined by the spec: takes effect
    assert (routes[0].address, routes[0].data) == (ADDR, 0x99)
    m.table.write(12, 4, 1)
    m.notify(0)
    m.reset()
    assert cfg.read(cap + PCI_MSIX_FLAGS, 2) == 2
    assert m.table.read(0, 4) == 0 and m.table.read(12, 4) == 1
    assert m.pba.read(0, 4) == 0  # pending signal dropped
    m.notify(5)  # out of range: ignored
    m.close()
    assert all(r.closed for r in routes)


def test_bad_geometry():
    ic = FakeInterruptController()
    with pytest.raises(ValueError):
        MsixTable(0, ic, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x800)
    with pytest.raises(ValueError):
        MsixTable(1, ic, table_bar=0, table_offset=4, pba_bar=0, pba_offset=0x800)
