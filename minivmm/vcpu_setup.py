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

# CPUID leaves (Documentation/virt/kvm/x86/cpuid.rst; Intel SDM vol. 2A "CPUID"; AMD APM vol. 3
# appendix E "Obtaining Processor Information Via the CPUID Instruction")
KVM_CPUID_SIGNATURE = 0x40000000
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_CPUID_FEATURES = 0x40000001  # EAX: KVM_FEATURE_* paravirtual features
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # the kernel's spelling
CPUID_LEAF_FEATURES = 1
CPUID_LEAF_CACHE_PARAMS = 4
CPUID_LEAF_EXT_TOPOLOGY = 0xB
CPUID_LEAF_V2_EXT_TOPOLOGY = 0x1F
CPUID_LEAF_EXT_FEATURES = 0x80000001
CPUID_LEAF_AMD_SIZE_IDS = 0x80000008
CPUID_LEAF_AMD_CACHE_TOPOLOGY = 0x8000001D
CPUID_LEAF_AMD_EXT_APIC_ID = 0x8000001E
CPUID_HYPERVISOR_BIT = 1 << 31  # leaf 1, ECX
CPUID_HTT_BIT = 1 << 28  # leaf 1, EDX: EBX[23:16] (logical processors per package) is valid
CPUID_CMP_LEGACY_BIT = 1 << 1  # leaf 0x80000001, ECX: "core multi-processing legacy mode"
CACHE_SHARING_MASK = 0xFFF << 14  # leaves 4 and 0x8000001D, EAX[25:14]: logical processors sharing the cache - 1
CORES_PER_PACKAGE_MASK = 0x3F << 26  # leaf 4, EAX[31:26]: addressable core IDs per package - 1
TOPOLOGY_LEVEL_SMT = 1  # leaf 0xB/0x1F, ECX[15:8]
TOPOLOGY_LEVEL_CORE = 2

# Local APIC registers (Intel SDM vol. 3, table 11-1) and LVT delivery modes
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_EXTINT = 0x7
APIC_MODE_NMI = 0x4
MSR_IA32_APICBASE = 0x1B
APICBASE_BSP = 1 << 8  # set by KVM on vCPU 0 (the bootstrap processor) only
APICBASE_ENABLE = 1 << 11


def _topology_leaf(function: int, index: int) -> list[dict[str, int]]:
    """Leaf 0xB/0x1F for a package of one core of one thread (SDM vol. 2A, CPUID leaf 0BH):
    the SMT and core levels each count 1 logical processor and shift the x2APIC id by 0,
    so the package id is the APIC id; subleaf 2 is the invalid level that ends the list."""
    levels = ((0, 1, TOPOLOGY_LEVEL_SMT << 8), (0, 1, TOPOLOGY_LEVEL_CORE << 8 | 1), (0, 0, 2))
    return [
        dict(function=function, index=sub, flags=KVM_CPUID_FLAG_SIGNIFCANT_INDEX, eax=eax, ebx=ebx, ecx=ecx, edx=index)
        for sub, (eax, ebx, ecx) in enumerate(levels)
    ]


def vcpu_cpuid(supported: Iterable[dict[str, int]], index: int, hidden_kvm_features: int = 0) -> list[dict[str, int]]:
    """CPUID of vCPU `index`: what KVM supports, with the hypervisor bit and KVM signature set,
    and one consistent topology: every vCPU is a package of one core of one thread whose
    (x2)APIC id is `index` (the MADT's, `boot.acpi.madt`; KVM gives vCPU n local APIC id n).

    Leaf 1 EBX[31:24] and leaves 0xB/0x1F EDX carry the APIC id; leaf 1 counts one logical
    processor per package (HTT clear); leaf 4 and AMD's 0x8000001D share no cache with another
    processor; AMD's 0x80000008 counts one core (NC = 0, ApicIdCoreIdSize = 0) and 0x8000001E
    gives the extended APIC id, core 0, node 0. Without these, KVM would pass on the host's
    topology (e.g. 2 threads per core on an SMT host), which does not match the MADT."""
    entries = []
    done_topology: set[int] = set()
    for entry in supported:
        e = dict(entry)
        fn = e["function"]
        if fn == CPUID_LEAF_FEATURES:
            e["ebx"] = (e["ebx"] & 0x0000FFFF) | (1 << 16) | (index << 24)
            e["ecx"] |= CPUID_HYPERVISOR_BIT
            e["edx"] &= ~CPUID_HTT_BIT
        elif fn in (CPUID_LEAF_EXT_TOPOLOGY, CPUID_LEAF_V2_EXT_TOPOLOGY):
            if fn not in done_topology:  # replaces every subleaf KVM listed
                done_topology.add(fn)
                entries += _topology_leaf(fn, index)
            continue
        elif fn == CPUID_LEAF_CACHE_PARAMS:
            e["eax"] &= ~(CACHE_SHARING_MASK | CORES_PER_PACKAGE_MASK)
        elif fn == CPUID_LEAF_AMD_CACHE_TOPOLOGY:
            e["eax"] &= ~CACHE_SHARING_MASK
        elif fn == CPUID_LEAF_EXT_FEATURES:
            e["ecx"] &= ~CPUID_CMP_LEGACY_BIT
        elif fn == CPUID_LEAF_AMD_SIZE_IDS:
            e["ecx"] &= ~0xF0FF  # NC (7:0) and ApicIdCoreIdSize (15:12)
        elif fn == CPUID_LEAF_AMD_EXT_APIC_ID:
            e["eax"], e["ebx"], e["ecx"] = index, 0, 0
        elif fn == KVM_CPUID_SIGNATURE:
            e["ebx"], e["ecx"], e["edx"] = struct.unpack("<3I", KVM_SIGNATURE)
        elif fn == KVM_CPUID_FEATURES:
            e["eax"] &= ~hidden_kvm_features
        entries.append(e)
    return entries


def setup_cpuid(vcpu: Vcpu, supported: Iterable[dict[str, int]], index: int, hidden_kvm_features: int = 0) -> None:
    """KVM_SET_CPUID2 with `vcpu_cpuid` (the KVM signature leaf tells Linux it runs on KVM:
    kvmclock, paravirt features)."""
    vcpu.set_cpuid(vcpu_cpuid(supported, index, hidden_kvm_features))


def setup_vcpu(vcpu: Vcpu, supported: Iterable[dict[str, int]], entry: BootEntry | None, hidden_kvm_features: int = 0) -> None:
    """Everything vCPU `vcpu.index` needs before its first KVM_RUN.

    Every vCPU gets its CPUID (`vcpu_cpuid`), MSRs and FPU state. The bootstrap processor
    (vCPU 0, KVM's default boot CPU: KVM sets its MSR_IA32_APICBASE BSP bit) also gets the
    boot `entry` and the virtual-wire LAPIC set-up firmware leaves. An application processor
    keeps KVM's reset state: with the in-kernel LAPIC, KVM holds it in wait-for-SIPI
    (KVM_MP_STATE_UNINITIALIZED) inside KVM_RUN until the guest sends it INIT and a start-up
    IPI, which reset its LAPIC and registers and start it in real mode at the SIPI vector
    (SDM vol. 3, 8.4.4 "MP Initialization Example"; MultiProcessor Specification B.4)."""
    setup_cpuid(vcpu, supported, vcpu.index, hidden_kvm_features)
    setup_msrs(vcpu)
    setup_fpu(vcpu)
    if entry is not None:
        setup_lapic(vcpu)
        apply_entry(vcpu, entry)


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
