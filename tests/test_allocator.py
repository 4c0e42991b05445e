"""The machine's resource allocator: slots, GSIs and address windows."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivmm import layout
from minivmm.allocator import AddressAllocator, IdAllocator, ResourceAllocator
from minivmm.errors import UserError
from minivmm.layout import GiB, MiB
from minivmm.ranges import AddressRange


def test_pmem_regions_are_128m_aligned_disjoint_and_limited() -> None:
    res = ResourceAllocator(1 * GiB)
    a = res.pmem.allocate(1 * MiB, layout.PMEM_ALIGN, "pmem0")
    b = res.pmem.allocate(200 * MiB, layout.PMEM_ALIGN, "pmem1")
    c = res.pmem.allocate(128 * MiB, layout.PMEM_ALIGN, "pmem2")
    assert a.base == layout.pmem_base(layout.ram_top(1 * GiB))
    assert b.base == a.base + 128 * MiB and c.base == b.base + 256 * MiB
    with pytest.raises(UserError, match="^big: no room for 600G in the pmem window, below the 39-bit guest physical address limit"):
        res.pmem.allocate(600 * GiB, layout.PMEM_ALIGN, "big")
    small = ResourceAllocator(1 * GiB, phys_addr_bits=36)
    with pytest.raises(UserError, match="36-bit guest physical address limit"):
        small.pmem.allocate(64 * GiB, layout.PMEM_ALIGN, "big")


def test_a_freed_range_is_reused_first_fit() -> None:
    alloc = AddressAllocator("the test window", AddressRange(0x1000, 0x10000))
    a = alloc.allocate(0x1000, 0x1000, "a")
    b = alloc.allocate(0x2000, 0x2000, "b")
    assert (a.base, b.base) == (0x1000, 0x2000)
    alloc.free(a)
    assert alloc.allocate(0x800, 0x800, "c").base == 0x1000
    with pytest.raises(ValueError):
        alloc.free(a)


@given(st.lists(st.tuples(st.integers(0, 16), st.integers(0, 12)), max_size=40))
def test_allocations_stay_aligned_inside_the_window_and_disjoint(requests) -> None:
    window = AddressRange(0x10_0000, 0x40_0000)
    alloc = AddressAllocator("the test window", window)
    got: list[AddressRange] = []
    for size_log, align_log in requests:
        size, align = 1 << size_log << 4, 1 << align_log
        try:
            rng = alloc.allocate(size, align, "x")
        except UserError:
            continue
        assert rng.base % align == 0 and window.covers(rng.base, rng.size) and rng.size == size
        assert not any(rng.overlaps(other) for other in got)
        got.append(rng)


def test_ids_lowest_free_first_and_exhaustion_is_a_user_error() -> None:
    gsis = IdAllocator("MSI GSIs", 24, 27)
    assert [gsis.allocate() for _ in range(3)] == [24, 25, 26]
    with pytest.raises(UserError, match="out of MSI GSIs: all 3 are in use"):
        gsis.allocate()
    gsis.free(25)
    assert gsis.allocate() == 25
    with pytest.raises(ValueError):
        gsis.free(99)


def test_machine_windows_come_from_the_layout() -> None:
    res = ResourceAllocator(8 * GiB)
    assert res.mmio32.window == layout.PCI_MMIO32
    assert res.mmio64.window == layout.pci_mmio64_window(8 * GiB)
    assert res.gsis.first == layout.FIRST_MSI_GSI
