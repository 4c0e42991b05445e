"""The initial vCPU state, KVM-agnostic: segments, GDT, identity page tables, `BootEntry`.

Segment descriptors follow the Intel SDM vol. 3A, 3.4.5 ("Segment Descriptors") and 7.2.3
(TSS descriptor in 64-bit mode); paging structures follow 4.5 (4-level paging, 2 MiB pages).
`Segment` has exactly the fields of KVM's `struct kvm_segment`, so the machine copies them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

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

    @classmethod
    def from_descriptor(cls, selector: int, desc: int) -> Segment:
        """Decode an 8-byte GDT entry (the inverse of `descriptor`, for tests and tracing)."""
        limit = (desc & 0xFFFF) | (((desc >> 48) & 0xF) << 16)
        base = ((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24)
        access = (desc >> 40) & 0xFF
        flags = (desc >> 52) & 0xF
        g = (flags >> 3) & 1
        return cls(
            selector=selector,
            base=base,
            limit=(limit << 12) | 0xFFF if g else limit,
            type=access & 0xF,
            present=access >> 7,
            dpl=(access >> 5) & 3,
            db=(flags >> 2) & 1,
            s=(access >> 4) & 1,
            l=(flags >> 1) & 1,
            g=g,
            avl=flags & 1,
        )


CODE32 = Segment(BOOT_CS32, 0, 0xFFFFFFFF, SEG_TYPE_CODE_XR_ACCESSED, present=1, dpl=0, db=1, s=1, l=0, g=1)
CODE64 = Segment(BOOT_CS, 0, 0xFFFFFFFF, SEG_TYPE_CODE_XR_ACCESSED, present=1, dpl=0, db=0, s=1, l=1, g=1)
DATA = Segment(BOOT_DS, 0, 0xFFFFFFFF, SEG_TYPE_DATA_RW_ACCESSED, present=1, dpl=0, db=1, s=1, l=0, g=1)
TSS = Segment(BOOT_TSS, 0, 0x67, SEG_TYPE_TSS_BUSY, present=1, dpl=0, db=0, s=0, l=0, g=0)
LDT_UNUSABLE = Segment(0, 0, 0, SEG_TYPE_LDT, present=0, dpl=0, db=0, s=0, l=0, g=0, unusable=1)

_GDT_ENTRY = struct.Struct("<Q")


def write_boot_gdt(mem: GuestMemory) -> tuple[int, int]:
    """Write the boot GDT at `layout.BOOT_GDT`; returns (base, limit) for GDTR.

    0x00 null, 0x08 flat 32-bit code (PVH), 0x10 64-bit code (__BOOT_CS), 0x18 flat data
    (__BOOT_DS), 0x20 busy TSS (a 16-byte system descriptor; the upper half is zero)."""
    base = layout.BOOT_GDT.base
    entries = [0, CODE32.descriptor(), CODE64.descriptor(), DATA.descriptor(), TSS.descriptor(), 0]
    mem.write(base, b"".join(_GDT_ENTRY.pack(e) for e in entries))
    return base, GDT_SIZE - 1


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


@dataclass(frozen=True)
class LoadedRange:
    """Where the loader put something in guest memory."""

    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True)
class BootEntry:
    """The complete initial state of the boot vCPU, independent of KVM.

    The machine copies: `rip`, `rsp`, `rbx`, `rsi`, `rflags` to kvm_regs (all others zero);
    `cr0`, `cr3`, `cr4`, `efer`, `gdt_base`/`gdt_limit`, `idt_base`/`idt_limit` and the
    segments `cs ds es fs gs ss tr ldt` (field for field) to kvm_sregs. Interrupts are off
    (RFLAGS.IF = 0). The remaining fields say where things were loaded (for --trace, tests).
    """

    protocol: str  # "pvh" | "bzimage"
    mode: str  # "protected32" | "long64"
    rip: int
    rsp: int
    rbx: int
    rsi: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    gdt_base: int
    gdt_limit: int
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    kernel: LoadedRange  # the loaded image (bzImage: protected-mode part; vmlinux: PT_LOADs)
    cmdline: LoadedRange  # including the terminating NUL
    boot_info: int  # boot_params (zero page) or hvm_start_info address
    rsdp_addr: int
    initrd: LoadedRange | None = None
    ldt: Segment = LDT_UNUSABLE
    rflags: int = X86_EFLAGS_FIXED
    idt_base: int = 0
    idt_limit: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def regs(self) -> dict[str, int]:
        """General registers to set (every other one is zero)."""
        return {"rip": self.rip, "rsp": self.rsp, "rbx": self.rbx, "rsi": self.rsi, "rflags": self.rflags}

    @property
    def segments(self) -> dict[str, Segment]:
        return {n: getattr(self, n) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")}

    def describe(self) -> list[str]:
        """Human-readable lines for --trace."""
        lines = [
            f"boot: {self.protocol} entry {self.mode} rip={self.rip:#x} rsp={self.rsp:#x} rbx={self.rbx:#x} rsi={self.rsi:#x}",
            f"boot: cr0={self.cr0:#x} cr3={self.cr3:#x} cr4={self.cr4:#x} efer={self.efer:#x} gdt={self.gdt_base:#x}/{self.gdt_limit:#x}",
            f"boot: kernel {self.kernel.gpa:#x}-{self.kernel.end - 1:#x} ({self.kernel.size} bytes)",
            f"boot: cmdline at {self.cmdline.gpa:#x} ({self.cmdline.size - 1} bytes), boot info at {self.boot_info:#x}, RSDP at {self.rsdp_addr:#x}",
        ]
        if self.initrd is not None:
            lines.append(f"boot: initrd {self.initrd.gpa:#x}-{self.initrd.end - 1:#x} ({self.initrd.size} bytes)")
        lines.extend(f"boot: {n}" for n in self.notes)
        return lines


def _flat_state(mode: str, code: Segment, cr0: int, cr3: int = 0, cr4: int = 0, efer: int = 0) -> dict[str, object]:
    """Flat segments (code + one data segment everywhere), the boot TSS and the boot stack."""
    data = {seg: DATA for seg in ("ds", "es", "fs", "gs", "ss")}
    return {"mode": mode, "cr0": cr0, "cr3": cr3, "cr4": cr4, "efer": efer, "cs": code, **data, "tr": TSS,
            "rsp": layout.BOOT_STACK_TOP}  # fmt: skip


def protected32_state() -> dict[str, object]:
    """Register state of the PVH entry (Xen docs/misc/pvh.pandoc): 32-bit protected mode,
    paging off, flat 4 GiB code and data segments, a busy 32-bit TSS."""
    return _flat_state("protected32", CODE32, X86_CR0_PE | X86_CR0_ET)


def long64_state(cr3: int) -> dict[str, object]:
    """Register state of the 64-bit boot protocol (boot.rst, "64-bit Boot Protocol"): long
    mode, paging on with an identity map, __BOOT_CS code and __BOOT_DS data segments."""
    return _flat_state("long64", CODE64, X86_CR0_PE | X86_CR0_ET | X86_CR0_PG, cr3, X86_CR4_PAE, EFER_LME | EFER_LMA)
