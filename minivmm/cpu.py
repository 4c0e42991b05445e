"""Initial vCPU state: registers and segments from a boot entry, CPUID, MSRs, FPU and LAPIC.

The boot loaders describe the entry state without KVM types (`minivmm.boot.BootEntry`);
this module copies it into `kvm_sregs`/`kvm_regs` and sets what Linux expects firmware to
have set (Intel SDM vol. 3, "Processor Initialization"; Documentation/virt/kvm/api.rst).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, Iterable

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

CONTROL_REGISTERS = ("cr0", "cr3", "cr4", "efer")


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


def apply_entry(vcpu: Vcpu, entry: Any) -> None:
    """Copy a `BootEntry` (segments, control registers, descriptor tables, registers) into the vCPU."""
    sregs = vcpu.get_sregs()
    for name, seg in entry.segments.items():
        dst = getattr(sregs, name)
        for f in dataclasses.fields(seg):
            setattr(dst, f.name, getattr(seg, f.name))
    for name in CONTROL_REGISTERS:
        setattr(sregs, name, getattr(entry, name))
    sregs.gdt.base, sregs.gdt.limit = entry.gdt_base, entry.gdt_limit
    sregs.idt.base, sregs.idt.limit = entry.idt_base, entry.idt_limit
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for name, value in entry.regs.items():
        setattr(regs, name, value)
    vcpu.set_regs(regs)
