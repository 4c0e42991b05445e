"""A thin typed layer over the /dev/kvm ioctls (Documentation/virt/kvm/api.rst).

Struct layouts are cffi cdefs (ABI mode: no compiler) that mirror `linux/kvm.h` and
`asm/kvm.h` field by field; ioctl numbers are computed from them with the kernel's `_IOC`
encoding, so a layout mistake shows up as EINVAL/ENOTTY rather than silent corruption.
The ioctls go through `fcntl.ioctl`, which releases the GIL while the kernel runs the guest.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass

import cffi

from .errors import HostError
from .vcpu_exit import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MemoryFaultExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
    VcpuExit,
)

ffi = cffi.FFI()
ffi.cdef(
    """
    struct kvm_userspace_memory_region {
        uint32_t slot; uint32_t flags;
        uint64_t guest_phys_addr; uint64_t memory_size; uint64_t userspace_addr;
    };
    struct kvm_dirty_log { uint32_t slot; uint32_t padding1; uint64_t dirty_bitmap; };  /* union { void *; __u64 } */
    struct kvm_regs {
        uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
        uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
        uint64_t rip, rflags;
    };
    struct kvm_segment {
        uint64_t base; uint32_t limit; uint16_t selector;
        uint8_t type, present, dpl, db, s, l, g, avl, unusable, padding;
    };
    struct kvm_dtable { uint64_t base; uint16_t limit; uint16_t padding[3]; };
    struct kvm_sregs {
        struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
        struct kvm_dtable gdt, idt;
        uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
        uint64_t interrupt_bitmap[4];
    };
    struct kvm_fpu {
        uint8_t fpr[8][16]; uint16_t fcw; uint16_t fsw; uint8_t ftwx; uint8_t pad1;
        uint16_t last_opcode; uint64_t last_ip; uint64_t last_dp;
        uint8_t xmm[16][16]; uint32_t mxcsr; uint32_t pad2;
    };
    struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; };
    struct kvm_msrs { uint32_t nmsrs; uint32_t pad; struct kvm_msr_entry entries[]; };
    struct kvm_cpuid_entry2 {
        uint32_t function, index, flags, eax, ebx, ecx, edx, padding[3];
    };
    struct kvm_cpuid2 { uint32_t nent; uint32_t padding; struct kvm_cpuid_entry2 entries[]; };
    struct kvm_pit_config { uint32_t flags; uint32_t pad[15]; };
    struct kvm_irq_level { uint32_t irq; uint32_t level; };
    struct kvm_irq_routing_irqchip { uint32_t irqchip; uint32_t pin; };
    struct kvm_irq_routing_msi {
        uint32_t address_lo; uint32_t address_hi; uint32_t data; uint32_t devid;
    };
    struct kvm_irq_routing_entry {
        uint32_t gsi; uint32_t type; uint32_t flags; uint32_t pad;
        union {
            struct kvm_irq_routing_irqchip irqchip;
            struct kvm_irq_routing_msi msi;
            uint32_t pad[8];
        } u;
    };
    struct kvm_irq_routing { uint32_t nr; uint32_t flags; struct kvm_irq_routing_entry entries[]; };
    struct kvm_irqfd { uint32_t fd; uint32_t gsi; uint32_t flags; uint32_t resamplefd; uint8_t pad[16]; };
    struct kvm_ioeventfd {
        uint64_t datamatch; uint64_t addr; uint32_t len; int32_t fd; uint32_t flags; uint8_t pad[36];
    };
    struct kvm_translation {
        uint64_t linear_address; uint64_t physical_address;
        uint8_t valid; uint8_t writeable; uint8_t usermode; uint8_t pad[5];
    };
    struct kvm_vcpu_events {
        struct { uint8_t injected; uint8_t nr; uint8_t has_error_code; uint8_t pending;
                 uint32_t error_code; } exception;
        struct { uint8_t injected; uint8_t nr; uint8_t soft; uint8_t shadow; } interrupt;
        struct { uint8_t injected; uint8_t pending; uint8_t masked; uint8_t pad; } nmi;
        uint32_t sipi_vector;
        uint32_t flags;
        struct { uint8_t smm; uint8_t pending; uint8_t smm_inside_nmi; uint8_t latched_init; } smi;
        struct { uint8_t pending; } triple_fault;
        uint8_t reserved[26];
        uint8_t exception_has_payload;
        uint64_t exception_payload;
    };
    struct kvm_lapic_state { char regs[1024]; };
    struct kvm_mp_state { uint32_t mp_state; };
    struct kvm_run_io { uint8_t direction; uint8_t size; uint16_t port; uint32_t count; uint64_t data_offset; };
    struct kvm_run_mmio { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; };
    struct kvm_run_internal { uint32_t suberror; uint32_t ndata; uint64_t data[16]; };
    struct kvm_run_fail_entry { uint64_t hardware_entry_failure_reason; uint32_t cpu; };
    struct kvm_run_system_event { uint32_t type; uint32_t ndata; uint64_t data[16]; };
    struct kvm_run {
        uint8_t request_interrupt_window;
        uint8_t immediate_exit;
        uint8_t padding1[6];
        uint32_t exit_reason;
        uint8_t ready_for_interrupt_injection;
        uint8_t if_flag;
        uint16_t flags;
        uint64_t cr8;
        uint64_t apic_base;
        union {
            struct { uint64_t hardware_exit_reason; } hw;
            struct kvm_run_fail_entry fail_entry;
            struct kvm_run_io io;
            struct kvm_run_mmio mmio;
            struct kvm_run_internal internal;
            struct kvm_run_system_event system_event;
            char padding[256];
        };  /* anonymous, as in linux/kvm.h */
        uint64_t kvm_valid_regs;
        uint64_t kvm_dirty_regs;
        union { char padding[2048]; } s;  /* struct kvm_sync_regs is not used */
    };
    int ioctl(int fd, unsigned long request, ...);
    """
)
_libc = ffi.dlopen(None)
_EXIT_UNION_OFFSET = ffi.offsetof("struct kvm_run", "hw")  # where every exit's data starts

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _IO(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _IOW(nr: int, ctype: str) -> int:
    return _ioc(_IOC_WRITE, nr, ffi.sizeof(ctype))


def _IOR(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ, nr, ffi.sizeof(ctype))


def _IOWR(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ffi.sizeof(ctype))


KVM_API_VERSION = 12
# System ioctls
KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, "struct kvm_cpuid2")
# VM ioctls
KVM_CREATE_VCPU = _IO(0x41)
KVM_GET_DIRTY_LOG = _IOW(0x42, "struct kvm_dirty_log")
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _IO(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(0x48, "uint64_t")
KVM_CREATE_IRQCHIP = _IO(0x60)
KVM_IRQ_LINE = _IOW(0x61, "struct kvm_irq_level")
KVM_SET_GSI_ROUTING = _IOW(0x6A, "struct kvm_irq_routing")
KVM_IRQFD = _IOW(0x76, "struct kvm_irqfd")
KVM_CREATE_PIT2 = _IOW(0x77, "struct kvm_pit_config")
KVM_IOEVENTFD = _IOW(0x79, "struct kvm_ioeventfd")
# vCPU ioctls
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, "struct kvm_regs")
KVM_SET_REGS = _IOW(0x82, "struct kvm_regs")
KVM_GET_SREGS = _IOR(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _IOW(0x84, "struct kvm_sregs")
KVM_TRANSLATE = _IOWR(0x85, "struct kvm_translation")
KVM_GET_MSRS = _IOWR(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _IOW(0x89, "struct kvm_msrs")
KVM_GET_FPU = _IOR(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _IOW(0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _IOR(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _IOW(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _IOW(0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2 = _IOWR(0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _IOR(0x98, "struct kvm_mp_state")
KVM_GET_VCPU_EVENTS = _IOR(0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _IOW(0xA0, "struct kvm_vcpu_events")

# Capabilities minivmm relies on (KVM_CAP_*)
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9  # the recommended maximum of vCPUs
KVM_CAP_NR_MEMSLOTS = 10
KVM_DEFAULT_MEMSLOTS = 32  # KVM_USER_MEM_SLOTS before KVM_CAP_NR_MEMSLOTS existed
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_MAX_VCPUS = 66  # the hard maximum of vCPUs
KVM_CAP_IMMEDIATE_EXIT = 136
# vCPU multiprocessing states (KVM_GET_MP_STATE, api.rst 4.38)
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1  # an application processor waiting for INIT/SIPI
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
REQUIRED_CAPS = {
    "KVM_CAP_IRQCHIP": KVM_CAP_IRQCHIP,
    "KVM_CAP_USER_MEMORY": KVM_CAP_USER_MEMORY,
    "KVM_CAP_SET_TSS_ADDR": KVM_CAP_SET_TSS_ADDR,
    "KVM_CAP_EXT_CPUID": KVM_CAP_EXT_CPUID,
    "KVM_CAP_IRQ_ROUTING": KVM_CAP_IRQ_ROUTING,
    "KVM_CAP_IRQFD": KVM_CAP_IRQFD,
    "KVM_CAP_PIT2": KVM_CAP_PIT2,
    "KVM_CAP_IOEVENTFD": KVM_CAP_IOEVENTFD,
    "KVM_CAP_SET_IDENTITY_MAP_ADDR": KVM_CAP_SET_IDENTITY_MAP_ADDR,
    "KVM_CAP_VCPU_EVENTS": KVM_CAP_VCPU_EVENTS,
    "KVM_CAP_IMMEDIATE_EXIT": KVM_CAP_IMMEDIATE_EXIT,
}

# Exit reasons (KVM_EXIT_*)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_MEMORY_FAULT = 39
# kvm_run's memory_fault member (linux/kvm.h since 6.8, newer than the headers the ABI test
# compiles against): three __u64 at the start of the exit union: flags, gpa, size.
KVM_RUN_MEMORY_FAULT = struct.Struct("<QQQ")
EXIT_NAMES = {
    v: k[len("KVM_EXIT_") :].lower() for k, v in dict(globals()).items() if k.startswith("KVM_EXIT_")
}
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_BAD_IO_EXIT = -1  # minivmm's own: a KVM_EXIT_IO whose data lies outside kvm_run
KVM_SYSTEM_EVENT_SHUTDOWN, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_CRASH = 1, 2, 3

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
DIRTY_LOG_PAGE_SIZE = 4096  # one bit of a dirty bitmap per 4 KiB guest page (api.rst 4.8)
KVM_PIT_SPEAKER_DUMMY = 1
KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI = 1, 2
KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_VCPUEVENT_VALID_NMI_PENDING = 1 << 0
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 1 << 1
KVM_VCPUEVENT_VALID_SHADOW = 1 << 2


def _ioctl(fd: int, request: int, arg: object = 0) -> int:
    """ioctl on a KVM fd; `arg` is an int or a cffi struct pointer (passed by buffer, mutated in place)."""
    if isinstance(arg, int):
        if -(2**31) <= arg < 2**31:
            return fcntl.ioctl(fd, request, arg)
        # fcntl.ioctl passes a C int; an unsigned long argument (e.g. a TSS address above
        # 2 GiB) goes through libc directly.
        ret = _libc.ioctl(fd, request, ffi.cast("unsigned long", arg))
        if ret < 0:
            err = ffi.errno
            raise OSError(err, os.strerror(err))
        return ret
    return fcntl.ioctl(fd, request, ffi.buffer(arg), True)


def _flex(ctype: str, count_field: str, entry_ctype: str, count: int) -> tuple[object, object]:
    """Allocate a struct ending in a flexible array (kvm_cpuid2, kvm_msrs, kvm_irq_routing).

    Returns (raw, typed): pass `raw` to the ioctl (its buffer covers the entries too)."""
    raw = ffi.new("char[]", ffi.sizeof(ctype) + count * ffi.sizeof(entry_ctype))
    typed = ffi.cast(f"{ctype} *", raw)
    setattr(typed, count_field, count)
    return raw, typed


CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


class Kvm:
    """The /dev/kvm system fd: API version, capabilities, supported CPUID."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise HostError(f"{path} does not exist: this host has no KVM (load kvm_intel/kvm_amd or use a VM with nested virtualisation)") from None
        except PermissionError:
            raise HostError(f"no permission to open {path}: run as root or join the 'kvm' group") from None
        except OSError as exc:
            raise HostError(f"cannot open {path}: {exc.strerror}") from None
        version = _ioctl(self.fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            raise HostError(f"KVM API version {version}, minivmm needs {KVM_API_VERSION}")
        missing = [name for name, cap in REQUIRED_CAPS.items() if not self.check_extension(cap)]
        if missing:
            raise HostError(f"KVM lacks capabilities minivmm needs: {', '.join(missing)}")
        self.vcpu_mmap_size = _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def max_memory_slots(self) -> int:
        """KVM_CAP_NR_MEMSLOTS (api.rst 4.4): how many memory slots a VM may have (32 if unsaid)."""
        return self.check_extension(KVM_CAP_NR_MEMSLOTS) or KVM_DEFAULT_MEMSLOTS

    def max_vcpus(self) -> int:
        """KVM_CAP_MAX_VCPUS, else KVM_CAP_NR_VCPUS, else 4 (api.rst 4.7 KVM_CREATE_VCPU)."""
        return self.check_extension(KVM_CAP_MAX_VCPUS) or self.check_extension(KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self) -> list[dict[str, int]]:
        for n in (128, 256, 512):
            raw, cpuid = _flex("struct kvm_cpuid2", "nent", "struct kvm_cpuid_entry2", n)
            try:
                _ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, raw)
            except OSError as exc:
                if exc.errno == errno.E2BIG:
                    continue
                raise
            return [
                {f: getattr(cpuid.entries[i], f) for f in CPUID_FIELDS}
                for i in range(cpuid.nent)
            ]
        raise HostError("KVM_GET_SUPPORTED_CPUID: too many entries")

    def create_vm(self) -> "Vm":
        return Vm(self, _ioctl(self.fd, KVM_CREATE_VM, 0))

    def close(self) -> None:
        os.close(self.fd)


class Vm:
    """A VM fd: memory slots, in-kernel irqchip and PIT, GSI routes, irqfds and ioeventfds."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {"slot": slot, "flags": flags, "guest_phys_addr": gpa, "memory_size": size, "userspace_addr": host_addr},
        )
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)

    def map_memory(
        self, slot: int, gpa: int, mapping: mmap.mmap, size: int, readonly: bool = False, log_dirty: bool = False
    ) -> None:
        """Give the guest [gpa, gpa+size) backed by a host mapping (a KVM memory slot); with
        `log_dirty` KVM records which pages the guest writes (KVM_MEM_LOG_DIRTY_PAGES)."""
        host_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(mapping)))
        flags = (KVM_MEM_READONLY if readonly else 0) | (KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        self.set_user_memory_region(slot, gpa, size, host_addr, flags)

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        """KVM_GET_DIRTY_LOG (api.rst 4.8): the bitmap of the slot's pages written since the last
        call, bit i of byte i // 8 for page i; `npages` rounded up to 64 bits as KVM fills it.

        Without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled (minivmm never enables it) the call
        gets AND clears the log atomically, write-protecting the pages again: a guest store
        after it sets its bit anew, so no write between two calls is missed."""
        nbytes = (npages + 63) // 64 * 8
        bitmap = ffi.new("uint8_t[]", nbytes)
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": int(ffi.cast("uintptr_t", bitmap))})
        _ioctl(self.fd, KVM_GET_DIRTY_LOG, log)
        return bytes(ffi.buffer(bitmap))

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", addr))

    def create_irqchip(self) -> None:
        _ioctl(self.fd, KVM_CREATE_IRQCHIP)

    def create_pit2(self) -> None:
        _ioctl(self.fd, KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *", {"flags": KVM_PIT_SPEAKER_DUMMY}))

    def irq_line(self, irq: int, level: bool) -> None:
        _ioctl(self.fd, KVM_IRQ_LINE, ffi.new("struct kvm_irq_level *", {"irq": irq, "level": int(level)}))

    def set_gsi_routing(self, entries: list["GsiRoute"]) -> None:
        raw, table = _flex("struct kvm_irq_routing", "nr", "struct kvm_irq_routing_entry", len(entries))
        for i, route in enumerate(entries):
            e = table.entries[i]
            e.gsi = route.gsi
            e.type = route.type
            if route.type == KVM_IRQ_ROUTING_IRQCHIP:
                e.u.irqchip.irqchip, e.u.irqchip.pin = route.irqchip, route.pin
            else:
                e.u.msi.address_lo = route.address & 0xFFFFFFFF
                e.u.msi.address_hi = route.address >> 32
                e.u.msi.data = route.data
        _ioctl(self.fd, KVM_SET_GSI_ROUTING, raw)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        flags = KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        _ioctl(self.fd, KVM_IRQFD, ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi, "flags": flags}))

    def ioeventfd(
        self, addr: int, length: int, fd: int, *, pio: bool = False, datamatch: int | None = None, deassign: bool = False
    ) -> None:
        flags = (KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        arg = {"datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd, "flags": flags}
        _ioctl(self.fd, KVM_IOEVENTFD, ffi.new("struct kvm_ioeventfd *", arg))

    def create_vcpu(self, index: int) -> "Vcpu":
        return Vcpu(self, index, _ioctl(self.fd, KVM_CREATE_VCPU, index))

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class GsiRoute:
    """One entry of the GSI routing table: an irqchip pin or an MSI message."""

    gsi: int
    type: int
    irqchip: int = 0
    pin: int = 0
    address: int = 0
    data: int = 0


class Vcpu:
    """A vCPU fd and its shared `struct kvm_run` page."""

    def __init__(self, vm: Vm, index: int, fd: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self.run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.kvm_run = ffi.from_buffer("struct kvm_run *", self.run_map)
        mmio_data = ffi.offsetof("struct kvm_run", "mmio") + ffi.offsetof("struct kvm_run_mmio", "data")
        self._mmio_data = memoryview(self.run_map)[mmio_data : mmio_data + 8]

    def run(self) -> VcpuExit:
        """KVM_RUN until the next exit to userspace, decoded (api.rst 4.10 "KVM_RUN", 5 "The
        kvm_run structure"). EINTR (a signal or `immediate_exit`) is an `InterruptedExit`.

        Data views of the returned exit point into the `kvm_run` page: they are valid until the
        next `run()`.

        EAGAIN is run again: KVM_RUN on an application processor in wait-for-SIPI
        (KVM_MP_STATE_UNINITIALIZED) blocks in the kernel, and returns EAGAIN once an INIT or
        start-up IPI woke it (arch/x86/kvm/x86.c, kvm_arch_vcpu_ioctl_run)."""
        while True:
            try:
                _ioctl(self.fd, KVM_RUN)
                break
            except BlockingIOError:
                continue
            except InterruptedError:
                return InterruptedExit()
            except OSError as exc:
                if exc.errno != errno.EFAULT:
                    raise
                return self.memory_fault()
        return self._decode(self.kvm_run.exit_reason)

    def memory_fault(self) -> MemoryFaultExit:
        """Decode a `KVM_RUN` that failed with EFAULT: KVM could not back a guest page. Only
        when KVM set exit_reason to KVM_EXIT_MEMORY_FAULT does `kvm_run` say which one (api.rst
        5); otherwise exit_reason is stale and the page is unknown."""
        if self.kvm_run.exit_reason == KVM_EXIT_MEMORY_FAULT:
            flags, gpa, size = KVM_RUN_MEMORY_FAULT.unpack_from(self.run_map, _EXIT_UNION_OFFSET)
            return MemoryFaultExit(gpa, size, flags)
        return MemoryFaultExit()

    def _decode(self, reason: int) -> VcpuExit:
        u = self.kvm_run
        if reason == KVM_EXIT_IO:
            io = u.io
            off, size, count = io.data_offset, io.size, io.count
            if size not in (1, 2, 4) or off + size * count > len(self.run_map):
                return InternalErrorExit(KVM_INTERNAL_ERROR_BAD_IO_EXIT)  # never from a sane KVM
            view = memoryview(self.run_map)[off : off + size * count]
            return IoExit(io.port, size, count, io.direction == KVM_EXIT_IO_OUT, view)
        if reason == KVM_EXIT_MMIO:
            m = u.mmio
            size = min(m.len, 8)
            return MmioExit(m.phys_addr, size, bool(m.is_write), self._mmio_data[:size])
        if reason == KVM_EXIT_INTERNAL_ERROR:
            n = min(u.internal.ndata, 16)
            return InternalErrorExit(u.internal.suberror, tuple(u.internal.data[0:n]))
        if reason == KVM_EXIT_SYSTEM_EVENT:
            n = min(u.system_event.ndata, 16)
            return SystemEventExit(u.system_event.type, tuple(u.system_event.data[0:n]))
        if reason == KVM_EXIT_SHUTDOWN:
            return ShutdownExit()
        if reason == KVM_EXIT_HLT:
            return HltExit()
        if reason == KVM_EXIT_INTR:
            return InterruptedExit()
        if reason == KVM_EXIT_FAIL_ENTRY:
            return FailEntryExit(u.fail_entry.hardware_entry_failure_reason, u.fail_entry.cpu)
        return UnknownExit(reason, EXIT_NAMES.get(reason, f"exit{reason}"))

    def set_immediate_exit(self, value: bool) -> None:
        """`kvm_run.immediate_exit`: make the next KVM_RUN return EINTR at once (api.rst 5)."""
        self.kvm_run.immediate_exit = int(value)

    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        _ioctl(self.fd, KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs) -> None:
        _ioctl(self.fd, KVM_SET_REGS, regs)

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        _ioctl(self.fd, KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs) -> None:
        _ioctl(self.fd, KVM_SET_SREGS, sregs)

    def get_fpu(self):
        fpu = ffi.new("struct kvm_fpu *")
        _ioctl(self.fd, KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu) -> None:
        _ioctl(self.fd, KVM_SET_FPU, fpu)

    def get_lapic(self):
        lapic = ffi.new("struct kvm_lapic_state *")
        _ioctl(self.fd, KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic) -> None:
        _ioctl(self.fd, KVM_SET_LAPIC, lapic)

    def get_vcpu_events(self):
        events = ffi.new("struct kvm_vcpu_events *")
        _ioctl(self.fd, KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events) -> None:
        _ioctl(self.fd, KVM_SET_VCPU_EVENTS, events)

    def set_cpuid(self, entries: list[dict[str, int]]) -> None:
        raw, cpuid = _flex("struct kvm_cpuid2", "nent", "struct kvm_cpuid_entry2", len(entries))
        for i, entry in enumerate(entries):
            for k, v in entry.items():
                setattr(cpuid.entries[i], k, v)
        _ioctl(self.fd, KVM_SET_CPUID2, raw)

    def get_cpuid(self, max_entries: int = 256) -> list[dict[str, int]]:
        """The CPUID entries KVM_SET_CPUID2 gave this vCPU (KVM_GET_CPUID2)."""
        raw, cpuid = _flex("struct kvm_cpuid2", "nent", "struct kvm_cpuid_entry2", max_entries)
        _ioctl(self.fd, KVM_GET_CPUID2, raw)
        return [{f: getattr(cpuid.entries[i], f) for f in CPUID_FIELDS} for i in range(cpuid.nent)]

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS: index -> value of each MSR KVM could read (it stops at the first it cannot)."""
        raw, table = _flex("struct kvm_msrs", "nmsrs", "struct kvm_msr_entry", len(indices))
        for i, index in enumerate(indices):
            table.entries[i].index = index
        n = _ioctl(self.fd, KVM_GET_MSRS, raw)
        return {table.entries[i].index: table.entries[i].data for i in range(n)}

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: KVM_MP_STATE_RUNNABLE, _UNINITIALIZED (waiting for SIPI), _HALTED..."""
        state = ffi.new("struct kvm_mp_state *")
        _ioctl(self.fd, KVM_GET_MP_STATE, state)
        return state.mp_state

    def set_msrs(self, msrs: dict[int, int]) -> int:
        raw, table = _flex("struct kvm_msrs", "nmsrs", "struct kvm_msr_entry", len(msrs))
        for i, (index, data) in enumerate(msrs.items()):
            table.entries[i].index = index
            table.entries[i].data = data
        return _ioctl(self.fd, KVM_SET_MSRS, raw)

    def translate(self, linear: int) -> int | None:
        """Guest-physical address of a guest-linear one under the vCPU's current paging, or None."""
        tr = ffi.new("struct kvm_translation *", {"linear_address": linear})
        try:
            _ioctl(self.fd, KVM_TRANSLATE, tr)
        except OSError:
            return None
        return tr.physical_address if tr.valid else None

    def close(self) -> None:
        ffi.release(self.kvm_run)  # the from_buffer view pins run_map: mmap.close() would raise BufferError
        self._mmio_data.release()
        self.run_map.close()
        os.close(self.fd)
