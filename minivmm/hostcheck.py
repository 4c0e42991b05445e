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
# iteration (README "Boot time").
SLOW_STRING_FEATURES = ("erms", "fsrm")
SOFTWARE_KVM_CMDLINE = "clearcpuid=" + ",".join(HIDDEN_CPU_FEATURES + SLOW_STRING_FEATURES)


@dataclass(frozen=True)
class HostKvm:
    software_kvm: bool
    module: str | None
    notice: str | None


def probe(sys_module: Path = Path("/sys/module")) -> HostKvm:
    for name in SOFTWARE_KVM_MODULES:
        if (sys_module / name).exists():
            return HostKvm(
                True,
                name,
                f"software KVM ({name}) detected: guest kernel code is emulated; hiding CPU features it "
                f"cannot emulate with {SOFTWARE_KVM_CMDLINE.split('=')[0]}=",
            )
    return HostKvm(False, None, None)
