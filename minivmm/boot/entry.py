"""The boot vCPU's entry state, KVM-agnostic: `CpuMode`, segments, the boot GDT, identity
page tables and `BootEntry`.

A boot protocol names the processor mode it enters in (`CpuMode`); `entry_state` turns that
mode into every register value, and `setup_entry` also writes the GDT (and, for long mode,
the page tables) those values point at. `minivmm.vcpu_setup.apply_entry` copies a
`BootEntry` into a KVM vCPU field for field.

Segment descriptors follow the Intel SDM vol. 3A, 3.4.5 ("Segment Descriptors") and 7.2.3
(TSS descriptor in 64-bit mode); paging structures follow 4.5 (4-level paging, 2 MiB pages).
`Segment` has exactly the fields of KVM's `struct kvm_segment`, `DescriptorTable` those of
`struct kvm_dtable`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .. import layout
from ..memory import GuestMemory

# Control and model-specific register bits (SDM vol. 3A, 2.5 and 2.2.1).
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
X86_EFLAGS_FIXED = 1 << 1  # bit 1 of RFLAGS always reads 1; IF (bit 9) stays clear

# Page-table entry bits (SDM vol. 3A, 4.5, tables 4-15..4-18).
PTE_PRESENT = 1 << 0
PTE_RW = 1 << 1
PTE_PS = 1 << 7  # in a PDE: maps a 2 MiB page

# Segment descriptor types (SDM vol. 3A, 3.4.5.1 and 3.5).
SEG_TYPE_DATA_RW_ACCESSED = 0x3
SEG_TYPE_CODE_XR_ACCESSED = 0xB
SEG_TYPE_TSS_BUSY = 0xB  # system segment: 32-bit (or, in IA-32e mode, 64-bit) busy TSS
SEG_TYPE_LDT = 0x2

# Selectors of the boot GDT (Linux: GDT_ENTRY_BOOT_CS = 2, GDT_ENTRY_BOOT_DS = 3).
BOOT_CS32 = 0x08
BOOT_CS = 0x10  # __BOOT_CS
BOOT_DS = 0x18  # __BOOT_DS
BOOT_TSS = 0x20  # 16-byte system descriptor (0x20-0x2F)
GDT_SIZE = 0x30


@dataclass(frozen=True)
class Segment:
    """A segment register's hidden state, field for field as KVM's `struct kvm_segment`.

    `limit` is the byte-granular limit KVM wants (0xFFFFFFFF for a flat 4 GiB segment with
    g=1); `descriptor()` encodes the matching 8-byte GDT entry."""

    selector: int
    base: int
    limit: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int
    g: int
    avl: int = 0
    unusable: int = 0

    def descriptor(self) -> int:
        """The GDT entry (SDM 3.4.5): limit[15:0], base[23:0], access, limit[19:16], flags, base[31:24]."""
        limit = self.limit >> 12 if self.g else self.limit
        access = (self.type & 0xF) | (self.s << 4) | (self.dpl << 5) | (self.present << 7)
        flags = self.avl | (self.l << 1) | (self.db << 2) | (self.g << 3)
        return (
            (limit & 0xFFFF)
            | ((self.base & 0xFFFFFF) << 16)
            | (access << 40)
            | (((limit >> 16) & 0xF) << 48)
            | (flags << 52)
            | (((self.base >> 24) & 0xFF) << 56)
        )


CODE32 = Segment(BOOT_CS32, 0, 0xFFFFFFFF, SEG_TYPE_CODE_XR_ACCESSED, present=1, dpl=0, db=1, s=1, l=0, g=1)
CODE64 = Segment(BOOT_CS, 0, 0xFFFFFFFF, SEG_TYPE_CODE_XR_ACCESSED, present=1, dpl=0, db=0, s=1, l=1, g=1)
DATA = Segment(BOOT_DS, 0, 0xFFFFFFFF, SEG_TYPE_DATA_RW_ACCESSED, present=1, dpl=0, db=1, s=1, l=0, g=1)
TSS = Segment(BOOT_TSS, 0, 0x67, SEG_TYPE_TSS_BUSY, present=1, dpl=0, db=0, s=0, l=0, g=0)
LDT_UNUSABLE = Segment(0, 0, 0, SEG_TYPE_LDT, present=0, dpl=0, db=0, s=0, l=0, g=0, unusable=1)

_GDT_ENTRY = struct.Struct("<Q")


@dataclass(frozen=True)
class DescriptorTable:
    """GDTR or IDTR (SDM vol. 3A, 2.4.1 and 2.4.3): linear base and byte limit, as KVM's
    `struct kvm_dtable`."""

    base: int
    limit: int


def write_boot_gdt(mem: GuestMemory) -> DescriptorTable:
    """Write the boot GDT at `layout.BOOT_GDT`; returns GDTR.

    0x00 null, 0x08 flat 32-bit code (PVH), 0x10 64-bit code (__BOOT_CS), 0x18 flat data
    (__BOOT_DS), 0x20 busy TSS (a 16-byte system descriptor; the upper half is zero)."""
    base = layout.BOOT_GDT.base
    entries = [0, CODE32.descriptor(), CODE64.descriptor(), DATA.descriptor(), TSS.descriptor(), 0]
    mem.write(base, b"".join(_GDT_ENTRY.pack(e) for e in entries))
    return DescriptorTable(base, GDT_SIZE - 1)


IDENTITY_MAP_SIZE = 4 * layout.GiB


def write_identity_page_tables(mem: GuestMemory) -> int:
    """Identity-map [0, 4 GiB) with 2 MiB pages (SDM 4.5); returns CR3 (the PML4 address).

    PML4[0] -> PDPT; PDPT[0..3] -> four page directories; PDE[i] maps i * 2 MiB."""
    pml4, pdpt, pd = layout.PML4_ADDR, layout.PDPT_ADDR, layout.PD_ADDR
    mem.write(pml4, struct.pack("<Q", pdpt | PTE_PRESENT | PTE_RW).ljust(4096, b"\0"))
    ndirs = IDENTITY_MAP_SIZE // layout.GiB
    mem.write(pdpt, b"".join(struct.pack("<Q", pd + i * 4096 | PTE_PRESENT | PTE_RW) for i in range(ndirs)).ljust(4096, b"\0"))
    two_mib = 2 * layout.MiB
    pdes = struct.pack(f"<{512 * ndirs}Q", *(i * two_mib | PTE_PRESENT | PTE_RW | PTE_PS for i in range(512 * ndirs)))
    mem.write(pd, pdes)
    return pml4


class CpuMode(enum.Enum):
    """The processor mode a boot protocol enters the kernel in."""

    PROTECTED32 = "protected32"
    """Xen docs/misc/pvh.pandoc, "x86/HVM direct boot ABI": 32-bit protected mode, paging
    off, flat 4 GiB code (execute/read) and data (read/write) segments, a 32-bit TSS."""
    LONG64 = "long64"
    """Documentation/arch/x86/boot.rst, "64-bit Boot Protocol": long mode, paging on with an
    identity map of the loaded kernel, zero page and command line, __BOOT_CS (64-bit code)
    and __BOOT_DS (data) segments."""


@dataclass(frozen=True)
class Registers:
    """The general registers the entry sets (the `struct kvm_regs` fields of the same name);
    the others keep their reset values (SDM vol. 3A, 9.1.1: zero, but EDX holds the processor
    signature). RFLAGS.IF is clear: interrupts stay off until the kernel enables them."""

    rip: int
    rsp: int = layout.BOOT_STACK_TOP
    rbx: int = 0  # PVH: the hvm_start_info address
    rsi: int = 0  # 64-bit boot protocol: the boot_params (zero page) address
    rflags: int = X86_EFLAGS_FIXED


@dataclass(frozen=True)
class BootEntry:
    """The complete initial state of the boot vCPU, independent of KVM.

    `regs` goes to `struct kvm_regs`; the control registers, `gdt`/`idt` and the eight
    segments go, field for field, to `struct kvm_sregs` (`vcpu_setup.apply_entry`)."""

    mode: CpuMode
    regs: Registers
    cr0: int
    cr3: int
    cr4: int
    efer: int
    gdt: DescriptorTable
    idt: DescriptorTable
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment

    def describe(self) -> list[str]:
        """Human-readable lines for --trace."""
        r = self.regs
        return [
            f"entry {self.mode.value} rip={r.rip:#x} rsp={r.rsp:#x} rbx={r.rbx:#x} rsi={r.rsi:#x}",
            f"cr0={self.cr0:#x} cr3={self.cr3:#x} cr4={self.cr4:#x} efer={self.efer:#x} gdt={self.gdt.base:#x}/{self.gdt.limit:#x}",
        ]


def entry_state(mode: CpuMode, regs: Registers, gdt: DescriptorTable, cr3: int = 0) -> BootEntry:
    """Every register value of the entry in `mode` (see `CpuMode`), with `gdt` as GDTR and,
    for `LONG64`, `cr3` pointing at the page tables. Both modes use flat segments (code plus
    one data segment everywhere), the busy boot TSS, no LDT and an empty IDT."""
    if mode is CpuMode.PROTECTED32:
        if cr3:
            raise ValueError("PROTECTED32 entry has paging off: no CR3")
        code, cr0, cr4, efer = CODE32, X86_CR0_PE | X86_CR0_ET, 0, 0
    else:
        if not cr3:
            raise ValueError("LONG64 entry needs page tables (CR3)")
        code, cr0, cr4, efer = CODE64, X86_CR0_PE | X86_CR0_ET | X86_CR0_PG, X86_CR4_PAE, EFER_LME | EFER_LMA
    return BootEntry(
        mode=mode,
        regs=regs,
        cr0=cr0,
        cr3=cr3,
        cr4=cr4,
        efer=efer,
        gdt=gdt,
        idt=DescriptorTable(0, 0),
        cs=code,
        ds=DATA,
        es=DATA,
        fs=DATA,
        gs=DATA,
        ss=DATA,
        tr=TSS,
        ldt=LDT_UNUSABLE,
    )


def setup_entry(mem: GuestMemory, mode: CpuMode, regs: Registers) -> BootEntry:
    """Write what the entry state points at into `mem` (the boot GDT; for `LONG64` also the
    identity page tables) and return that state."""
    gdt = write_boot_gdt(mem)
    cr3 = write_identity_page_tables(mem) if mode is CpuMode.LONG64 else 0
    return entry_state(mode, regs, gdt, cr3)
