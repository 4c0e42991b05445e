"""The entry state: `CpuMode` -> registers and segments (`boot.entry`), what `setup_entry`
writes to guest memory, and `vcpu_setup.apply_entry` copying it into a real KVM vCPU."""

# ruff: noqa: F811  (test functions take the imported fixtures as parameters)
from __future__ import annotations

import dataclasses

import pytest

from minivmm import layout
from minivmm.boot import entry
from minivmm.boot.entry import CpuMode, DescriptorTable, Registers, Segment, entry_state, setup_entry
from minivmm.kvm import ffi
from minivmm.memory import GuestMemory
from minivmm.vcpu_setup import apply_entry
from support.descriptors import decode_descriptor
from tinyguest import CODE, STACK_TOP, kick_handler, make_guest  # noqa: F401  (pytest fixtures, used by name)

GDT = DescriptorTable(layout.BOOT_GDT.base, entry.GDT_SIZE - 1)
REGS = Registers(rip=0x100_0000, rbx=0x2000, rsi=0x7000)
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


def junk_memory() -> GuestMemory:
    mem = GuestMemory.anonymous(2 * layout.MiB)
    mem.view(0, 2 * layout.MiB)[:] = b"\xcc" * (2 * layout.MiB)
    return mem


def test_protected32_is_flat_32bit_protected_mode_with_paging_off() -> None:
    """pvh.pandoc: CR0.PE set, paging off, flat 4 GiB 32-bit code and data, a 32-bit TSS."""
    e = entry_state(CpuMode.PROTECTED32, REGS, GDT)
    assert e.mode is CpuMode.PROTECTED32
    assert (e.cr0, e.cr3, e.cr4, e.efer) == (entry.X86_CR0_PE | entry.X86_CR0_ET, 0, 0, 0)
    assert e.cs == entry.CODE32 and (e.cs.db, e.cs.l, e.cs.selector) == (1, 0, entry.BOOT_CS32)


def test_long64_is_long_mode_with_paging_and_boot_cs() -> None:
    """boot.rst, 64-bit Boot Protocol: paging and long mode on, __BOOT_CS 64-bit code."""
    e = entry_state(CpuMode.LONG64, REGS, GDT, cr3=layout.PML4_ADDR)
    assert e.mode is CpuMode.LONG64
    assert e.cr0 == entry.X86_CR0_PE | entry.X86_CR0_ET | entry.X86_CR0_PG
    assert (e.cr3, e.cr4, e.efer) == (layout.PML4_ADDR, entry.X86_CR4_PAE, entry.EFER_LME | entry.EFER_LMA)
    assert e.cs == entry.CODE64 and (e.cs.db, e.cs.l, e.cs.selector) == (0, 1, entry.BOOT_CS)


@pytest.mark.parametrize("mode", list(CpuMode))
def test_both_modes_share_data_segments_tss_and_registers(mode: CpuMode) -> None:
    e = entry_state(mode, REGS, GDT, cr3=layout.PML4_ADDR if mode is CpuMode.LONG64 else 0)
    assert (e.ds, e.es, e.fs, e.gs, e.ss) == (entry.DATA,) * 5 and e.ds.selector == entry.BOOT_DS
    assert e.tr == entry.TSS and e.ldt.unusable == 1 and e.ldt.present == 0
    assert e.gdt == GDT and e.idt == DescriptorTable(0, 0)
    assert e.regs == REGS and REGS.rsp == layout.BOOT_STACK_TOP
    assert REGS.rflags == entry.X86_EFLAGS_FIXED  # IF clear: interrupts off at entry


def test_mode_and_cr3_must_agree() -> None:
    with pytest.raises(ValueError, match="paging off"):
        entry_state(CpuMode.PROTECTED32, REGS, GDT, cr3=layout.PML4_ADDR)
    with pytest.raises(ValueError, match="page tables"):
        entry_state(CpuMode.LONG64, REGS, GDT)


def test_setup_entry_protected32_writes_the_gdt_only() -> None:
    mem = junk_memory()
    e = setup_entry(mem, CpuMode.PROTECTED32, REGS)
    assert e == entry_state(CpuMode.PROTECTED32, REGS, GDT)
    for seg in (e.cs, e.ds, e.tr):
        assert decode_descriptor(seg.selector, mem.read_int(e.gdt.base + seg.selector, 8)) == seg
    assert mem.read(layout.PAGE_TABLES.base, layout.PAGE_TABLES.size) == b"\xcc" * layout.PAGE_TABLES.size


def test_setup_entry_long64_writes_gdt_and_identity_page_tables() -> None:
    mem = junk_memory()
    e = setup_entry(mem, CpuMode.LONG64, REGS)
    assert e == entry_state(CpuMode.LONG64, REGS, GDT, cr3=layout.PML4_ADDR)
    assert decode_descriptor(entry.BOOT_CS, mem.read_int(e.gdt.base + entry.BOOT_CS, 8)) == e.cs
    pml4e = mem.read_int(e.cr3, 8)
    assert pml4e == layout.PDPT_ADDR | entry.PTE_PRESENT | entry.PTE_RW
    pde = mem.read_int(layout.PD_ADDR + 8 * 5, 8)  # the 6th 2 MiB page of the first GiB
    assert pde == 5 * 2 * layout.MiB | entry.PTE_PRESENT | entry.PTE_RW | entry.PTE_PS


def test_segment_and_descriptor_table_have_the_kvm_struct_fields() -> None:
    """apply_entry copies field for field: the dataclasses must name every KVM field."""
    kvm_segment = [name for name, _ in ffi.typeof("struct kvm_segment").fields if name != "padding"]
    kvm_dtable = [name for name, _ in ffi.typeof("struct kvm_dtable").fields if name != "padding"]
    assert sorted(f.name for f in dataclasses.fields(Segment)) == sorted(kvm_segment)
    assert sorted(f.name for f in dataclasses.fields(DescriptorTable)) == sorted(kvm_dtable)


def read_segment(kvm_seg) -> Segment:
    return Segment(**{f.name: getattr(kvm_seg, f.name) for f in dataclasses.fields(Segment)})


@pytest.mark.parametrize("mode", list(CpuMode))
def test_apply_entry_sets_every_field_on_a_kvm_vcpu(make_guest, mode: CpuMode) -> None:
    """What KVM_GET_SREGS/KVM_GET_REGS read back is the entry state (the LDT only as unusable:
    VMX forgets the other attributes of an unusable segment)."""
    g = make_guest()
    e = setup_entry(g.mem, mode, Registers(rip=CODE, rsp=STACK_TOP, rbx=0x1234, rsi=0x5678))
    apply_entry(g.vcpu, e)
    sregs, regs = g.vcpu.get_sregs(), g.vcpu.get_regs()
    for name in SEGMENTS[:-1]:
        assert read_segment(getattr(sregs, name)) == getattr(e, name), name
    assert sregs.ldt.unusable == 1
    assert (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer) == (e.cr0, e.cr3, e.cr4, e.efer)
    assert DescriptorTable(sregs.gdt.base, sregs.gdt.limit) == e.gdt
    assert DescriptorTable(sregs.idt.base, sregs.idt.limit) == e.idt
    assert Registers(regs.rip, regs.rsp, regs.rbx, regs.rsi, regs.rflags) == e.regs
    assert (regs.rax, regs.rcx, regs.rdi, regs.rbp, regs.r15) == (0,) * 5  # reset values


def test_tiny_guest_long_mode_is_the_product_entry(make_guest) -> None:
    """The tiny-guest harness enters long mode through setup_entry + apply_entry."""
    g = make_guest(long_mode=True)
    assert g.entry == setup_entry(junk_memory(), CpuMode.LONG64, Registers(rip=CODE, rsp=STACK_TOP))
    sregs = g.vcpu.get_sregs()
    assert read_segment(sregs.cs) == entry.CODE64 and sregs.cr3 == layout.PML4_ADDR
