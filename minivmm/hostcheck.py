"""What kind of KVM this host has, and the guest command line a software KVM needs.

kvm_pvm (a software KVM) emulates guest kernel code; its emulator fails on XSAVE-family
instructions and `cmpxchg16b`, and its CPUID ignores KVM_SET_CPUID2 (the guest sees the host
CPU's features). The only way to keep Linux off those paths is to hide the features with
the kernel's `clearcpuid=` parameter. On hardware KVM none of this applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SOFTWARE_KVM_MODULES = ("kvm_pvm",)
HIDDEN_CPU_FEATURES = (
    "cx16", "xsave", "fsgsbase", "smap", "smep", "umip", "pku", "rdrand", "rdseed",
    "popcnt", "clwb", "sse4_2", "invpcid", "pcid", "rdpid",
)  # fmt: skip
# Not a failure but the boot's largest cost: the emulator runs a `rep movsb`/`rep stosb` one
# byte per iteration, and with ERMS (FSRM) Linux's memcpy, memset, clear_page, copy_user and
# copy_mc use exactly those. Hidden, they use `rep movsq`/`rep stosq` (REP_GOOD): 8 bytes per
# iteration (README "Boot time"; bench/rep_strings.py: a 2 MiB fill 2.5 s vs 0.35 s).
SLOW_STRING_FEATURES = ("erms", "fsrm")
CLEARCPUID = "clearcpuid=" + ",".join(HIDDEN_CPU_FEATURES + SLOW_STRING_FEATURES)
# Boot work of an SMP kernel (CONFIG_SMP=y) that costs seconds only where kernel code is
# emulated (README "Boot time"); a uniprocessor kernel has neither parameter (it would pass
# them on to /init), so they go only to a kernel whose version string says SMP:
# - noreplace-smp: with one CPU, an SMP kernel rewrites each of its ~5,000 `lock` prefixes to a
#   no-op (alternatives_smp_unlock), one text_poke() apiece through a temporary mm: ~2 s of
#   page-table switches here, a few cycles per atomic saved on hardware.
# - percpu_alloc=page: the default "embed" first chunk takes a 2 MiB unit (PMD_SIZE atoms) from
#   memblock and zeroes it, ~1 s here; "page" maps only the pages the per-CPU areas need.
SOFTWARE_KVM_BOOT_PARAMS = ("noreplace-smp", "percpu_alloc=page")


def software_kvm_cmdline(smp_kernel: bool) -> str:
    """The parameters minivmm appends on a software KVM: `CLEARCPUID`, and for an SMP kernel
    `SOFTWARE_KVM_BOOT_PARAMS`."""
    return " ".join((CLEARCPUID,) + (SOFTWARE_KVM_BOOT_PARAMS if smp_kernel else ()))


SOFTWARE_KVM_CMDLINE = software_kvm_cmdline(smp_kernel=True)

# KVM paravirtual features (CPUID 0x40000001 EAX, Documentation/virt/kvm/x86/cpuid.rst) that
# break an SMP guest on kvm_pvm; a one-vCPU guest never uses them. Hidden, Linux falls back to
# the local APIC for IPIs and to flush IPIs for remote TLB flushes (README "SMP").
# - A KVM hypercall (VMCALL/VMMCALL from emulated kernel code) never completes there: the vCPU
#   stays at the instruction with no exit. Linux's first PV IPI (KVM_HC_SEND_IPI) hung CPU 1
#   at `vmcall` in __send_ipi_mask while CPU 0 spun on a lock; the paravirtual spinlock kick
#   and yield are hypercalls too.
# - With PV TLB flush, Linux does not interrupt a preempted vCPU for a remote TLB flush but sets
#   KVM_VCPU_FLUSH_TLB in its steal-time record for KVM to flush before the vCPU runs again.
#   With it, nearly every program of an SMP guest faulted before main ("segfault at 0 ip
#   4a4d02", a freshly written TLS page read as zeros), PID 1's `exec poweroff` too; hidden,
#   the next boot ran its script without a fault, but later boots met it again (README "SMP").
#   Hidden as a precaution: a flush IPI needs nothing from KVM beyond the local APIC.
KVM_FEATURE_PV_UNHALT = 1 << 7  # KVM_HC_KICK_CPU (paravirtual spinlocks)
KVM_FEATURE_PV_TLB_FLUSH = 1 << 9  # KVM_VCPU_FLUSH_TLB in the steal-time record
KVM_FEATURE_PV_SEND_IPI = 1 << 11  # KVM_HC_SEND_IPI
KVM_FEATURE_PV_SCHED_YIELD = 1 << 13  # KVM_HC_SCHED_YIELD
SOFTWARE_KVM_HIDDEN_KVM_FEATURES = KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_TLB_FLUSH | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD


@dataclass(frozen=True)
class HostKvm:
    software_kvm: bool
    module: str | None
    notice: str | None

    @property
    def hidden_kvm_features(self) -> int:
        """KVM paravirtual feature bits (CPUID 0x40000001 EAX) to hide from the guest."""
        return SOFTWARE_KVM_HIDDEN_KVM_FEATURES if self.software_kvm else 0


def probe(sys_module: Path = Path("/sys/module")) -> HostKvm:
    for name in SOFTWARE_KVM_MODULES:
        if (sys_module / name).exists():
            return HostKvm(
                True,
                name,
                f"software KVM ({name}) detected: guest kernel code is emulated; hiding CPU features it "
                f"cannot emulate with clearcpuid= (and, for an SMP kernel, skipping boot work that is slow "
                f"there with {' '.join(SOFTWARE_KVM_BOOT_PARAMS)})",
            )
    return HostKvm(False, None, None)
