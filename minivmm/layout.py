"""The guest physical memory map and the platform's fixed I/O ports: one declared table.

Everything that places something in guest-physical space or claims a port takes its address
from here, so the map below is the whole truth (README copies it):

=========================  =========================  ==========================================
guest physical range       name                       contents
=========================  =========================  ==========================================
0x0000_0000-0x0000_0FFF    real_mode_ivt_bda          real-mode IVT and BIOS data area (zero)
0x0000_1000-0x0000_1FFF    boot_gdt                   GDT for the entry state (code32, code64,
                                                      data, TSS); Linux __BOOT_CS=0x10/DS=0x18
0x0000_2000-0x0000_2FFF    pvh_start_info             hvm_start_info, hvm_modlist_entry[1],
                                                      hvm_memmap_table_entry[] (PVH boot)
0x0000_3000-0x0000_3FFF    setup_data                 setup_data chain: SETUP_RNG_SEED (Linux
                                                      boot protocol; the kernel reserves it)
0x0000_6000-0x0000_6FFF    boot_stack                 initial stack (RSP = 0x6FF0)
0x0000_7000-0x0000_7FFF    zero_page                  boot_params (Linux boot protocol)
0x0000_9000-0x0000_EFFF    page_tables                PML4, PDPT, 4 PDs: 4 GiB identity, 2 MiB
0x0002_0000-0x0002_0FFF    cmdline                    kernel command line, NUL terminated
0x0009_FC00-0x0009_FFFF    ebda                       extended BIOS data area (reserved)
0x000A_0000-0x000D_FFFF    vga_rom_hole               legacy VGA/option-ROM hole (reserved)
0x000E_0000-0x000F_FFFF    acpi                       ACPI tables; RSDP at 0xE0000 (scannable)
0x0010_0000-...            kernel                     bzImage protected-mode code at 1 MiB;
                                                      vmlinux at its p_paddr (usually 16 MiB)
...-low RAM top            initrd                     page aligned, as high as allowed
low RAM top = min(mem, 3 GiB)
0xC000_0000-0xFEBF_FFFF    pci_mmio32                 32-bit PCI MMIO window (BARs)
0xFEC0_0000-0xFEC0_0FFF    ioapic                     I/O APIC
0xFEE0_0000-0xFEE0_0FFF    lapic                      local APICs
0x1_0000_0000-...          ram_high                   RAM above 3 GiB continues at 4 GiB
align_up(top, 1 GiB)       pci_mmio64                 64-bit PCI MMIO window, 16 GiB
after pci_mmio64           pmem                       pmem slots, 128 MiB aligned, below the
                                                      guest physical address limit (2^39)
=========================  =========================  ==========================================

Platform I/O ports (all owned by the machine's devices):

=============  ===========================================================
0x0060, 0x64   i8042 keyboard controller (data, command/status); reset
0x0080         POST diagnostic port (writes ignored)
0x03F8-0x3FF   COM1 16550 UART, ISA IRQ 4
0x0505         pvpanic (ACPI "QEMU0001"); reads report capabilities
0x0600         ACPI sleep control register (FADT SLEEP_CONTROL_REG)
0x0601         ACPI sleep status register (FADT SLEEP_STATUS_REG)
0x0608-0x60B   Generic Event Device (ACPI0013) event register; its interrupt is GSI 5
0x060C-0x60F   PCI hotplug controller: slots-added bitmap (read by the DSDT's PSCN)
0x0CF8-0xCFF   PCI configuration mechanism #1 (address 0xCF8, data 0xCFC)
=============  ===========================================================

E820 types follow the ACPI spec, section 15 ("System Address Map Interfaces").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import UserError
from .ranges import AddressRange
from .units import format_size

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4 * KiB


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def align_down(value: int, align: int) -> int:
    return value // align * align


@dataclass(frozen=True)
class NamedRange(AddressRange):
    """One named guest-physical range of the fixed map."""

    name: str = ""
    description: str = ""


# --- the fixed map (addresses independent of the memory size) ---------------------------------

REAL_MODE_IVT_BDA = NamedRange(0x0000, 0x1000, "real_mode_ivt_bda", "real-mode IVT and BIOS data area")
BOOT_GDT = NamedRange(0x1000, 0x1000, "boot_gdt", "GDT for the entry state")
PVH_START_INFO = NamedRange(0x2000, 0x1000, "pvh_start_info", "hvm_start_info, modlist and memmap")
# RAM in the E820 map: the kernel memblock-reserves setup_data itself before its first
# allocation (arch/x86/kernel/setup.c, memblock_x86_reserve_range_setup_data).
SETUP_DATA = NamedRange(0x3000, 0x1000, "setup_data", "setup_data chain (SETUP_RNG_SEED)")
BOOT_STACK = NamedRange(0x6000, 0x1000, "boot_stack", "initial stack")
ZERO_PAGE = NamedRange(0x7000, 0x1000, "zero_page", "boot_params (zero page)")
PAGE_TABLES = NamedRange(0x9000, 0x6000, "page_tables", "PML4, PDPT and 4 PDs identity-mapping 4 GiB")
CMDLINE = NamedRange(0x20000, 0x1000, "cmdline", "kernel command line")
EBDA = NamedRange(0x9FC00, 0x400, "ebda", "extended BIOS data area")
VGA_ROM_HOLE = NamedRange(0xA0000, 0x40000, "vga_rom_hole", "legacy VGA and option-ROM hole")
ACPI = NamedRange(0xE0000, 0x20000, "acpi", "ACPI tables; RSDP at the start")
HIGH_MEMORY = 0x100000  # 1 MiB: the bzImage protected-mode kernel is loaded here

LOW_RAM_MAX = 3 * GiB  # RAM below 4 GiB ends here at most
FOUR_GIB = 4 * GiB
PCI_MMIO32 = NamedRange(0xC000_0000, 0xFEC0_0000 - 0xC000_0000, "pci_mmio32", "32-bit PCI MMIO window")
IOAPIC = NamedRange(0xFEC0_0000, 0x1000, "ioapic", "I/O APIC")
LAPIC = NamedRange(0xFEE0_0000, 0x1000, "lapic", "local APIC")
# Intel VMX needs three pages for real-mode emulation (KVM_SET_TSS_ADDR) and one for the EPT
# identity map (KVM_SET_IDENTITY_MAP_ADDR); they sit above the LAPIC, clear of every window.
IDENTITY_MAP_ADDR = 0xFEFF_C000
TSS_ADDR = 0xFEFF_D000
PCI_MMIO64_SIZE = 16 * GiB
PCI_MMIO64_ALIGN = 1 * GiB
# A page-directory entry (PMD) maps 2 MiB (Intel SDM vol. 3A, 4.5 "4-level paging", table 4-18);
# it is also Linux's memory-hotplug subsection (SUBSECTION_SHIFT 21), the unit in which the
# guest's pmem driver gives a device struct pages (devm_memremap_pages).
PMD_SIZE = 2 * MiB
# Where pmem slots start: the x86-64 memory hotplug section size (SECTION_SIZE_BITS 27), a
# multiple of PMD_SIZE. With a slot start and a size (pmemfile.PMEM_SIZE_ALIGN) both PMD
# aligned, every 2 MiB of the device is a 2 MiB-aligned guest physical range, which ext4 DAX
# can map with one PMD fault (fs/dax.c dax_iomap_direct_access checks the pfn's alignment).
PMEM_ALIGN = 128 * MiB
DEFAULT_PHYS_ADDR_BITS = 39

FIXED_MAP: tuple[NamedRange, ...] = (
    REAL_MODE_IVT_BDA,
    BOOT_GDT,
    PVH_START_INFO,
    SETUP_DATA,
    BOOT_STACK,
    ZERO_PAGE,
    PAGE_TABLES,
    CMDLINE,
    EBDA,
    VGA_ROM_HOLE,
    ACPI,
    PCI_MMIO32,
    IOAPIC,
    LAPIC,
)

# Sub-layout of the fixed ranges.
BOOT_STACK_TOP = BOOT_STACK.end - 0x10
PVH_MODLIST_ADDR = PVH_START_INFO.base + 0x40
PVH_MEMMAP_ADDR = PVH_START_INFO.base + 0x80
PML4_ADDR = PAGE_TABLES.base
PDPT_ADDR = PAGE_TABLES.base + 0x1000
PD_ADDR = PAGE_TABLES.base + 0x2000  # 4 consecutive page directories
RSDP_ADDR = ACPI.base
SETUP_HEAP_END = 0xE000  # boot.rst: end of the setup heap, relative to the real-mode code

# --- platform I/O ports and interrupts --------------------------------------------------------

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
I8042_IRQ = 1
POST_PORT = 0x80
COM1_PORT = 0x3F8
COM1_PORT_COUNT = 8
COM1_IRQ = 4
PVPANIC_PORT = 0x505
ACPI_SLEEP_CONTROL_PORT = 0x600
ACPI_SLEEP_STATUS_PORT = 0x601
# The Generic Event Device (ACPI 6.5 5.6.9): one 32-bit event register, and its interrupt, a
# free ISA pin (no legacy device uses 5), level triggered and active high as its _CRS says.
GED_PORT = 0x608
GED_PORT_COUNT = 4
GED_GSI = 5
# The PCI hotplug controller: one 32-bit "slots added" register (README "Hotplug").
PCI_HOTPLUG_PORT = 0x60C
PCI_HOTPLUG_PORT_COUNT = 4
# Free bus-0 slots the DSDT gives an ACPI hotplug object at boot (--hotplug-slots): each costs
# the guest an ACPI device (~75 ms of emulated boot on kvm_pvm, ~2.4 s for all 31).
PCI_HOTPLUG_SLOTS_DEFAULT = 8
PCI_CONFIG_ADDRESS_PORT = 0xCF8
PCI_CONFIG_DATA_PORT = 0xCFC
PCI_CONFIG_PORT_COUNT = 8  # 0xCF8-0xCFF
IOAPIC_NUM_PINS = 24  # KVM's in-kernel IOAPIC (KVM_IOAPIC_NUM_PINS)
# vCPUs per machine: vCPU n has local APIC id n (MADT, CPUID); at most the default guest
# kernel's CONFIG_NR_CPUS (guest/kernel.config). One-byte xAPIC ids would allow 255.
MAX_VCPUS = 8
PIC_NUM_PINS = 16  # two cascaded 8259s
PCI_INTX_GSI_BASE = 16  # GSIs 16..23 carry PCI INTx
FIRST_MSI_GSI = IOAPIC_NUM_PINS  # GSIs from here on are MSI routes


def pci_intx_gsi(slot: int, pin: int) -> int:
    """The IOAPIC GSI that PCI device `slot` (0-31) pin `pin` (0=INTA..3=INTD) is wired to.

    The conventional swizzle over the 8 free IOAPIC pins 16-23; the DSDT's _PRT says the same,
    so the PCI model must assert exactly this GSI (level triggered, active low)."""
    return PCI_INTX_GSI_BASE + (slot + pin) % (IOAPIC_NUM_PINS - PCI_INTX_GSI_BASE)


# --- RAM and the E820 map ----------------------------------------------------------------------

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5
E820_PMEM = 7
E820_MAX_ENTRIES_ZEROPAGE = 128

MIN_MEM_SIZE = 16 * MiB
# Guest RAM without --mem: QEMU's and Firecracker's default. Every MiB costs boot time (struct
# page set-up and handing the pages to the buddy allocator, ~7 ms per MiB of emulated kernel
# code on kvm_pvm), so the default is the smallest that runs the default guest comfortably;
# `default_mem_size` raises it for large pmem devices.
DEFAULT_MEM_SIZE = 128 * MiB
MAX_DEFAULT_MEM_SIZE = 4 * GiB  # above this, --mem is the user's call (the checks say how much)


@dataclass(frozen=True)
class E820Entry:
    """One entry of the BIOS E820 map (struct boot_e820_entry: addr, size, type)."""

    addr: int
    size: int
    type: int

    FORMAT = struct.Struct("<QQI")  # struct boot_e820_entry, packed, 20 bytes

    @property
    def end(self) -> int:
        return self.addr + self.size

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.addr, self.size, self.type)


def check_mem_size(mem_size: int, phys_addr_bits: int = DEFAULT_PHYS_ADDR_BITS) -> None:
    """Reject a RAM size the map cannot hold (UserError)."""
    if mem_size < MIN_MEM_SIZE:
        raise UserError(f"memory size {mem_size // MiB} MiB is too small: the minimum is {MIN_MEM_SIZE // MiB} MiB")
    if mem_size % PAGE_SIZE:
        raise UserError(f"memory size {mem_size:#x} is not a multiple of 4 KiB")
    top = FOUR_GIB + mem_size - LOW_RAM_MAX if mem_size > LOW_RAM_MAX else mem_size
    if pmem_base(top) > 1 << phys_addr_bits:
        raise UserError(
            f"memory size {mem_size // GiB} GiB does not fit below the {phys_addr_bits}-bit guest physical address limit"
        )


def ram_ranges(mem_size: int) -> list[tuple[int, int]]:
    """Guest RAM as (gpa, size): up to 3 GiB from 0, the rest from 4 GiB."""
    check_mem_size(mem_size)
    low = min(mem_size, LOW_RAM_MAX)
    ranges = [(0, low)]
    if mem_size > low:
        ranges.append((FOUR_GIB, mem_size - low))
    return ranges


def low_ram_top(mem_size: int) -> int:
    """End of the RAM below 4 GiB (where the kernel, initrd and boot data must go)."""
    return min(mem_size, LOW_RAM_MAX)


def ram_top(mem_size: int) -> int:
    """End of the highest RAM range."""
    gpa, size = ram_ranges(mem_size)[-1]
    return gpa + size


def pci_mmio64_window(mem_size: int) -> AddressRange:
    """The 64-bit PCI MMIO window: 1 GiB aligned above RAM and above 4 GiB."""
    return AddressRange(align_up(max(ram_top(mem_size), FOUR_GIB), PCI_MMIO64_ALIGN), PCI_MMIO64_SIZE)


def pmem_base(ram_top: int) -> int:
    """First pmem slot address: 128 MiB aligned, past RAM ending at `ram_top` and past the
    64-bit PCI window (which sits 1 GiB aligned right above RAM and 4 GiB)."""
    mmio64 = align_up(max(ram_top, FOUR_GIB), PCI_MMIO64_ALIGN)
    return align_up(mmio64 + PCI_MMIO64_SIZE, PMEM_ALIGN)


def pmem_window(mem_size: int, phys_addr_bits: int = DEFAULT_PHYS_ADDR_BITS) -> AddressRange:
    """Where pmem regions go: from `pmem_base` up to the guest physical address limit."""
    base = pmem_base(ram_top(mem_size))
    return AddressRange(base, max(0, (1 << phys_addr_bits) - base))


# --- checks of a whole pmem layout, before any file is touched -----------------------------------

# Linux keeps a 64-byte `struct page` (x86-64) for every 4 KiB page of a pmem device it maps as
# ZONE_DEVICE memory, in guest RAM unless the namespace stores that memmap on the device itself
# (Documentation/driver-api/nvdimm/nvdimm.rst, "PFN"/"DAX" namespaces; virtio-pmem has no such
# namespace metadata, so it is always RAM).
STRUCT_PAGE_SIZE = 64
MEMMAP_REFUSE_SHARE = 0.5  # page structures above this share of guest RAM leave too little for the guest
MEMMAP_WARN_SHARE = 0.25


def pmem_memmap_size(pmem_sizes: list[int]) -> int:
    """Guest RAM Linux spends on page structures for pmem devices of these sizes."""
    return sum(size // PAGE_SIZE for size in pmem_sizes) * STRUCT_PAGE_SIZE


def check_pmem_layout(mem_size: int, pmem_sizes: list[int], phys_addr_bits: int = DEFAULT_PHYS_ADDR_BITS) -> list[str]:
    """Refuse (UserError) pmem regions that do not fit the pmem window (each is placed
    `PMEM_ALIGN` aligned after the previous one, as `allocator.AddressAllocator` does), or whose
    page structures take more than `MEMMAP_REFUSE_SHARE` of guest RAM. Returns warnings (one
    line each): page structures above `MEMMAP_WARN_SHARE` of guest RAM."""
    window = pmem_window(mem_size, phys_addr_bits)
    needed = sum(align_up(size, PMEM_ALIGN) for size in pmem_sizes)
    if needed > window.size:
        raise UserError(
            f"--pmem: {len(pmem_sizes)} device(s) need {format_size(needed)} of guest physical addresses, "
            f"but the pmem window below the {phys_addr_bits}-bit limit holds {format_size(window.size)}"
        )
    memmap = pmem_memmap_size(pmem_sizes)
    share = memmap / mem_size
    if share <= MEMMAP_WARN_SHARE:
        return []
    total = format_size(sum(pmem_sizes))
    needs = f"the guest needs {_mib(memmap)} of RAM for the page structures of {total} of pmem (64 bytes per 4 KiB page)"
    if share > MEMMAP_REFUSE_SHARE:
        at_least = align_up(int(memmap / MEMMAP_REFUSE_SHARE), MiB)
        raise UserError(f"--pmem: {needs}, more than half of --mem {_mib(mem_size)}; give --mem {_mib(at_least)} or more")
    return [f"--pmem: {needs}, {share:.0%} of --mem {_mib(mem_size)}"]


def default_mem_size(pmem_sizes: list[int]) -> int:
    """Guest RAM in bytes when --mem is not given: `DEFAULT_MEM_SIZE`, or, if larger, enough
    that the page structures of the pmem devices of `pmem_sizes` (bytes each) stay within
    `MEMMAP_WARN_SHARE` of it (whole MiB), up to `MAX_DEFAULT_MEM_SIZE`. E.g. 4 GiB of pmem (64 MiB
    of struct pages) -> 256 MiB. Devices hot-added later are not foreseen: their struct pages come
    out of the same RAM."""
    wanted = align_up(int(pmem_memmap_size(pmem_sizes) / MEMMAP_WARN_SHARE), MiB)
    return min(max(DEFAULT_MEM_SIZE, wanted), MAX_DEFAULT_MEM_SIZE)


def _mib(n: int) -> str:
    return f"{-(-n // MiB)} MiB"




def e820_map(mem_size: int) -> list[E820Entry]:
    """The E820 map the guest sees (also the PVH memmap): RAM, with the EBDA reserved, the
    VGA/ROM hole left out, the ACPI tables area typed ACPI and RAM from 1 MiB up."""
    low = low_ram_top(mem_size)
    entries = [
        E820Entry(0, EBDA.base, E820_RAM),
        E820Entry(EBDA.base, EBDA.size, E820_RESERVED),
        E820Entry(ACPI.base, ACPI.size, E820_ACPI),
        E820Entry(HIGH_MEMORY, low - HIGH_MEMORY, E820_RAM),
    ]
    for gpa, size in ram_ranges(mem_size)[1:]:
        entries.append(E820Entry(gpa, size, E820_RAM))
    return entries


def describe(mem_size: int) -> list[tuple[int, int, str]]:
    """The full map for `mem_size` as (base, size, name), sorted: for --trace and README."""
    rows = [(r.base, r.size, r.name) for r in FIXED_MAP]
    for i, (gpa, size) in enumerate(ram_ranges(mem_size)):
        rows.append((gpa, size, "ram_low" if i == 0 else "ram_high"))
    mmio64 = pci_mmio64_window(mem_size)
    rows.append((mmio64.base, mmio64.size, "pci_mmio64"))
    rows.append((pmem_base(ram_top(mem_size)), 0, "pmem"))
    return sorted(rows)
