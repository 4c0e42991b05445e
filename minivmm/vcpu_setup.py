"""Setting up a KVM vCPU: CPUID, MSRs, FPU and LAPIC, and the boot entry state.

The boot loaders describe the entry state without KVM types (`minivmm.boot.entry.BootEntry`);
`apply_entry` copies it into `kvm_sregs`/`kvm_regs`, and the `setup_*` functions set what
Linux expects firmware to have set (Intel SDM vol. 3, "Processor Initialization";
Documentation/virt/kvm/api.rst).
"""

from __future__ import annotations

import struct
from typing import Iterable, Protocol

from .boot.entry import BootEntry, DescriptorTable, Segment
from .kvm import Vcpu, ffi

# MSR indices (arch/x86/include/asm/msr-index.h)
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRRdefType = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_DEF_TYPE_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6

BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0,
    MSR_IA32_SYSENTER_ESP: 0,
    MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0,
    MSR_CSTAR: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_SYSCALL_MASK: 0,
    MSR_LSTAR: 0,
    MSR_IA32_TSC: 0,
    MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
    MSR_MTRRdefType: MTRR_DEF_TYPE_ENABLE | MTRR_TYPE_WRBACK,
}

# CPUID leaves (Documentation/virt/kvm/x86/cpuid.rst)
KVM_CPUID_SIGNATURE = 0x40000000
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
CPUID_LEAF_FEATURES = 1
CPUID_LEAF_EXT_TOPOLOGY = 0xB
CPUID_HYPERVISOR_BIT = 1 << 31  # leaf 1, ECX

# Local APIC registers (Intel SDM vol. 3, table 11-1) and LVT delivery modes
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_EXTINT = 0x7
APIC_MODE_NMI = 0x4


def setup_cpuid(vcpu: Vcpu, supported: Iterable[dict[str, int]], index: int) -> None:
    """CPUID = what KVM supports, with this vCPU's APIC id and the hypervisor bit set.

    The KVM signature leaf tells Linux it runs on KVM (kvmclock, paravirt features)."""
    entries = []
    for entry in supported:
        e = dict(entry)
        if e["function"] == CPUID_LEAF_FEATURES:
            e["ebx"] = (e["ebx"] & 0x00FFFFFF) | (index << 24)
            e["ecx"] |= CPUID_HYPERVISOR_BIT
        elif e["function"] == CPUID_LEAF_EXT_TOPOLOGY:
            e["edx"] = index
        elif e["function"] == KVM_CPUID_SIGNATURE:
            e["ebx"], e["ecx"], e["edx"] = struct.unpack("<3I", KVM_SIGNATURE)
        entries.append(e)
    vcpu.set_cpuid(entries)


def setup_msrs(vcpu: Vcpu) -> None:
    vcpu.set_msrs(BOOT_MSRS)


def setup_fpu(vcpu: Vcpu) -> None:
    """x87 control word and MXCSR at their FNINIT/reset defaults (all exceptions masked)."""
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)


def setup_lapic(vcpu: Vcpu) -> None:
    """LINT0 as ExtINT and LINT1 as NMI: the virtual-wire setup firmware leaves for the OS."""
    lapic = vcpu.get_lapic()
    regs = ffi.buffer(lapic)
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        value = struct.unpack_from("<I", regs, reg)[0]
        struct.pack_into("<I", regs, reg, (value & ~0x700) | (mode << 8))
    vcpu.set_lapic(lapic)


class KvmSegment(Protocol):
    """The fields of a cffi `struct kvm_segment` (kvm.py), as `Segment` has them."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741  (the kernel's name)
    g: int
    avl: int
    unusable: int


class KvmDtable(Protocol):
    """The fields of a cffi `struct kvm_dtable`."""

    base: int
    limit: int


def _set_segment(dst: KvmSegment, seg: Segment) -> None:
    """Copy a `Segment` into a cffi `struct kvm_segment` (the same fields; padding stays 0)."""
    dst.base, dst.limit, dst.selector = seg.base, seg.limit, seg.selector
    dst.type, dst.present, dst.dpl, dst.db = seg.type, seg.present, seg.dpl, seg.db
    dst.s, dst.l, dst.g, dst.avl, dst.unusable = seg.s, seg.l, seg.g, seg.avl, seg.unusable


def _set_dtable(dst: KvmDtable, table: DescriptorTable) -> None:
    """Copy a `DescriptorTable` into a cffi `struct kvm_dtable`."""
    dst.base, dst.limit = table.base, table.limit


def apply_entry(vcpu: Vcpu, entry: BootEntry) -> None:
    """Copy a `BootEntry` into the vCPU: segments, descriptor tables and control registers
    (KVM_SET_SREGS), then the general registers (KVM_SET_REGS; the others keep their reset values)."""
    sregs = vcpu.get_sregs()
    for dst, seg in (
        (sregs.cs, entry.cs),
        (sregs.ds, entry.ds),
        (sregs.es, entry.es),
        (sregs.fs, entry.fs),
        (sregs.gs, entry.gs),
        (sregs.ss, entry.ss),
        (sregs.tr, entry.tr),
        (sregs.ldt, entry.ldt),
    ):
        _set_segment(dst, seg)
    _set_dtable(sregs.gdt, entry.gdt)
    _set_dtable(sregs.idt, entry.idt)
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = entry.cr0, entry.cr3, entry.cr4, entry.efer
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    r = entry.regs
    regs.rip, regs.rsp, regs.rbx, regs.rsi, regs.rflags = r.rip, r.rsp, r.rbx, r.rsi, r.rflags
    vcpu.set_regs(regs)
