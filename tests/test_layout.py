"""The guest memory map: RAM ranges, E820, fixed areas, PCI windows and pmem slots."""

from __future__ import annotations

import itertools

import pytest

from minivmm import layout
from minivmm.errors import UserError

GiB, MiB = layout.GiB, layout.MiB


@pytest.mark.parametrize(
    "mem, expected",
    [
        (256 * MiB, [(0, 256 * MiB)]),
        (3 * GiB, [(0, 3 * GiB)]),
        (4 * GiB, [(0, 3 * GiB), (4 * GiB, 1 * GiB)]),
        (16 * GiB, [(0, 3 * GiB), (4 * GiB, 13 * GiB)]),
    ],
)
def test_ram_ranges(mem, expected):
    assert layout.ram_ranges(mem) == expected
    assert sum(size for _, size in expected) == mem
    assert layout.ram_top(mem) == expected[-1][0] + expected[-1][1]


def test_low_ram_never_reaches_the_pci_hole():
    for mem in (1 * GiB, 3 * GiB, 5 * GiB, 64 * GiB):
        low_gpa, low_size = layout.ram_ranges(mem)[0]
        assert low_gpa + low_size <= layout.PCI_MMIO32.base


@pytest.mark.parametrize("mem", [16 * MiB, 256 * MiB, 3 * GiB, 3 * GiB + 4096, 8 * GiB])
def test_e820_sorted_disjoint_and_covers_ram(mem):
    e820 = layout.e820_map(mem)
    for a, b in itertools.pairwise(e820):
        assert a.end <= b.addr
    ram = [e for e in e820 if e.type == layout.E820_RAM]
    # All RAM but the EBDA and the 640 KiB-1 MiB hole is usable.
    assert sum(e.size for e in ram) == mem - (layout.HIGH_MEMORY - layout.EBDA.base)
    for e in ram:
        assert any(gpa <= e.addr and e.end <= gpa + size for gpa, size in layout.ram_ranges(mem))
    kinds = {(e.addr, e.type) for e in e820}
    assert (layout.EBDA.base, layout.E820_RESERVED) in kinds
    assert (layout.ACPI.base, layout.E820_ACPI) in kinds
    assert len(e820) <= layout.E820_MAX_ENTRIES_ZEROPAGE


def test_e820_pack_is_boot_e820_entry():
    entry = layout.E820Entry(0x100000, 0x1000, layout.E820_RAM)
    assert entry.pack() == (0x100000).to_bytes(8, "little") + (0x1000).to_bytes(8, "little") + (1).to_bytes(4, "little")


def test_fixed_map_disjoint_and_low_areas_below_640k():
    ranges = sorted(layout.FIXED_MAP, key=lambda r: r.base)
    for a, b in itertools.pairwise(ranges):
        assert a.end <= b.base, (a.name, b.name)
    for r in (layout.BOOT_GDT, layout.PVH_START_INFO, layout.BOOT_STACK, layout.ZERO_PAGE, layout.PAGE_TABLES, layout.CMDLINE):
        assert r.end <= layout.EBDA.base
        assert r.base % layout.PAGE_SIZE == 0
    assert layout.ACPI.base == 0xE0000 and layout.ACPI.end == 0x100000
    assert layout.RSDP_ADDR in layout.ACPI and layout.RSDP_ADDR % 16 == 0
    assert layout.PCI_MMIO32.base == 0xC000_0000 and layout.PCI_MMIO32.end == 0xFEC0_0000
    assert layout.IOAPIC.base == 0xFEC0_0000 and layout.LAPIC.base == 0xFEE0_0000
    assert layout.PAGE_TABLES.size == 6 * 4096  # PML4 + PDPT + 4 PDs


@pytest.mark.parametrize("mem", [256 * MiB, 3 * GiB, 8 * GiB, 100 * GiB])
def test_mmio64_window_and_pmem_above_ram(mem):
    top = layout.ram_top(mem)
    window = layout.pci_mmio64_window(mem)
    base, size = window.base, window.size
    assert base >= max(top, 4 * GiB) and base % GiB == 0 and size == layout.PCI_MMIO64_SIZE
    pmem = layout.pmem_base(top)
    assert pmem >= base + size and pmem % layout.PMEM_ALIGN == 0


def test_pmem_window_starts_past_the_mmio64_window_and_ends_at_the_address_limit():
    window = layout.pmem_window(1 * GiB)
    assert window.base == layout.pmem_base(layout.ram_top(1 * GiB)) and window.end == 1 << 39
    assert layout.pmem_window(1 * GiB, phys_addr_bits=36).end == 1 << 36


def test_check_mem_size_errors():
    with pytest.raises(UserError, match="too small"):
        layout.ram_ranges(1 * MiB)
    with pytest.raises(UserError, match="multiple of 4 KiB"):
        layout.ram_ranges(256 * MiB + 1)
    with pytest.raises(UserError, match="39-bit"):
        layout.check_mem_size(600 * GiB)


def test_ports_and_irqs():
    assert layout.COM1_PORT == 0x3F8 and layout.COM1_IRQ == 4
    assert (layout.I8042_DATA_PORT, layout.I8042_COMMAND_PORT) == (0x60, 0x64)
    assert layout.PVPANIC_PORT == 0x505
    assert (layout.ACPI_SLEEP_CONTROL_PORT, layout.ACPI_SLEEP_STATUS_PORT) == (0x600, 0x601)
    assert layout.PCI_CONFIG_ADDRESS_PORT == 0xCF8 and layout.PCI_CONFIG_PORT_COUNT == 8
    # The GED's interrupt is an ISA pin no other device uses (and not a PCI INTx pin).
    assert layout.GED_GSI < layout.PCI_INTX_GSI_BASE
    assert layout.GED_GSI not in (0, 2, layout.I8042_IRQ, layout.COM1_IRQ)
    spans = [
        (layout.I8042_DATA_PORT, 1),
        (layout.I8042_COMMAND_PORT, 1),
        (layout.COM1_PORT, layout.COM1_PORT_COUNT),
        (layout.PVPANIC_PORT, 1),
        (layout.ACPI_SLEEP_CONTROL_PORT, 2),
        (layout.GED_PORT, layout.GED_PORT_COUNT),
        (layout.PCI_HOTPLUG_PORT, layout.PCI_HOTPLUG_PORT_COUNT),
        (layout.PCI_CONFIG_ADDRESS_PORT, layout.PCI_CONFIG_PORT_COUNT),
    ]
    spans.sort()
    for (a, n), (b, _) in itertools.pairwise(spans):
        assert a + n <= b


def test_pci_intx_gsi_swizzle():
    gsis = {layout.pci_intx_gsi(s, p) for s in range(32) for p in range(4)}
    assert gsis == set(range(16, 24))
    assert layout.pci_intx_gsi(1, 0) == layout.pci_intx_gsi(0, 1)


def test_describe_lists_everything_sorted():
    rows = layout.describe(8 * GiB)
    assert rows == sorted(rows)
    names = {name for _, _, name in rows}
    assert {"ram_low", "ram_high", "pci_mmio64", "pmem", "acpi", "ioapic", "lapic"} <= names


def test_default_mem_size_grows_with_cold_plugged_pmem():
    MiB = layout.MiB
    assert layout.default_mem_size([]) == layout.DEFAULT_MEM_SIZE == 128 * MiB
    assert layout.default_mem_size([256 * MiB]) == 128 * MiB  # 4 MiB of struct pages: 3 %
    assert layout.default_mem_size([4 << 30]) == 256 * MiB  # 64 MiB of struct pages: 25 %
    assert layout.default_mem_size([4 << 30, 4 << 30]) == 512 * MiB
    assert layout.default_mem_size([1 << 40]) == layout.MAX_DEFAULT_MEM_SIZE == 4 << 30  # then --mem is needed
    for sizes in ([2 * MiB], [3 << 30], [6 << 30, 2 * MiB], [64 << 30]):
        mem = layout.default_mem_size(sizes)
        assert mem % MiB == 0
        assert layout.check_pmem_layout(mem, sizes) == []  # no page-structure warning at the default
