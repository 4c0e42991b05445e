"""What `KVM_RUN` returned: one small typed value per exit kind (as kvm-ioctls' `VcpuExit`).

`kvm.Vcpu.run()` decodes `struct kvm_run` (Documentation/virt/kvm/api.rst, section 5,
"The kvm_run structure") into one of these; `exit_handler.handle_exit` acts on it. The
values are plain data, so a test can build any of them by hand and hand it to the handler
at a stopped vCPU, on any host.

`kind` is the exit's name in statistics and traces (the KVM_EXIT_* suffix, lower case).
Data areas (`IoExit.data`, `MmioExit.data`) are views into the vCPU's `kvm_run` page (or, in
a synthetic exit, into any buffer): writing them answers an IN or an MMIO read, as KVM reads
them back on the next `KVM_RUN`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union


@dataclass(frozen=True, slots=True)
class IoExit:
    """KVM_EXIT_IO: `count` port accesses of `size` bytes at `port` (a `rep ins/outs` has count > 1).

    `data` holds size * count bytes: the values written (OUT) or the place for the values read (IN)."""

    kind: ClassVar[str] = "io"
    port: int
    size: int
    count: int
    is_out: bool
    data: memoryview


@dataclass(frozen=True, slots=True)
class MmioExit:
    """KVM_EXIT_MMIO: one access of `size` (1-8) bytes at guest-physical `addr` that no memory
    slot or in-kernel device claimed. `data` holds `size` bytes (written, or to be filled)."""

    kind: ClassVar[str] = "mmio"
    addr: int
    size: int
    is_write: bool
    data: memoryview


@dataclass(frozen=True, slots=True)
class InternalErrorExit:
    """KVM_EXIT_INTERNAL_ERROR: KVM could not go on; `suberror` is KVM_INTERNAL_ERROR_*
    (1 = emulation failure), `data` the first `ndata` words KVM attached."""

    kind: ClassVar[str] = "internal_error"
    suberror: int
    data: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ShutdownExit:
    """KVM_EXIT_SHUTDOWN: the guest triple-faulted (or otherwise asked for a shutdown cycle)."""

    kind: ClassVar[str] = "shutdown"


@dataclass(frozen=True, slots=True)
class HltExit:
    """KVM_EXIT_HLT: the guest halted and no in-kernel LAPIC will wake it (no irqchip)."""

    kind: ClassVar[str] = "hlt"


@dataclass(frozen=True, slots=True)
class SystemEventExit:
    """KVM_EXIT_SYSTEM_EVENT: `type` is KVM_SYSTEM_EVENT_* (1 shutdown, 2 reset, 3 crash)."""

    kind: ClassVar[str] = "system_event"
    type: int
    data: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class InterruptedExit:
    """KVM_RUN returned EINTR (a signal, or `immediate_exit`), or KVM_EXIT_INTR."""

    kind: ClassVar[str] = "intr"


@dataclass(frozen=True, slots=True)
class FailEntryExit:
    """KVM_EXIT_FAIL_ENTRY: the hardware refused VM entry (`hardware_entry_failure_reason`)."""

    kind: ClassVar[str] = "fail_entry"
    hardware_entry_failure_reason: int
    cpu: int = 0


@dataclass(frozen=True, slots=True)
class MemoryFaultExit:
    """`KVM_RUN` failed with EFAULT: KVM could not map a guest page to host memory (a sparse
    backing file on a full filesystem, a truncated file, host memory exhausted). With
    KVM_EXIT_MEMORY_FAULT (api.rst 5, "KVM_EXIT_MEMORY_FAULT") KVM names the guest-physical
    range [`gpa`, `gpa` + `size`); a plain EFAULT names nothing (`gpa` is None)."""

    kind: ClassVar[str] = "memory_fault"
    gpa: int | None = None
    size: int = 0
    flags: int = 0


@dataclass(frozen=True, slots=True)
class UnknownExit:
    """Any other exit reason (minivmm does not ask for the others; it ends the run)."""

    reason: int
    name: str  # KVM_EXIT_* suffix in lower case, or "exitN"

    @property
    def kind(self) -> str:
        return self.name


VcpuExit = Union[
    IoExit,
    MmioExit,
    InternalErrorExit,
    ShutdownExit,
    HltExit,
    SystemEventExit,
    InterruptedExit,
    FailEntryExit,
    MemoryFaultExit,
    UnknownExit,
]
