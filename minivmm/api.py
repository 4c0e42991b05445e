"""Build a VM by hand: the small public API the tutorial (docs/tutorial.md) and the tests'
hand-assembled guests use.

A `BareVm` is one KVM VM with one vCPU (or `cpus` of them), some anonymous RAM at guest-physical address 0, a
port-I/O bus and an MMIO bus, and nothing else: no firmware, no kernel, no devices but the
ones you attach. It is assembled from the same parts `minivmm.machine.Machine` boots Linux
with - `kvm.Kvm`/`Vm`/`Vcpu`, `memory.GuestMemory`, `bus.Bus`, the exit path
(`vcpu.VcpuLoop` -> `exit_handler.handle_exit`), `allocator.ResourceAllocator`, the boot
entry code (`boot.entry.setup_entry`, `vcpu_setup.apply_entry`) and the in-kernel interrupt
routes (`kvm_interrupts.KvmInterrupts`) - so what a tutorial step shows is what the VMM does.

Typical use::

    with BareVm(ram_size=1 << 20, irqchip=False) as vm:
        vm.load(0x10000, code)                   # guest code at GPA 0x10000
        vm.add_port_device(0x3F8, 1, device)     # device.read(offset, size) / .write(offset, size, value)
        vm.start_real_mode(0x10000)              # or vm.start_long_mode(rip)
        stop = vm.run(timeout=5)                 # Stop(status, reason)
        print(vm.registers().rax, vm.stats.by_kind)

Units: addresses and sizes are bytes; guest addresses are guest-physical (GPA) unless named
otherwise; times are seconds. Errors: a bad argument raises `ValueError`; an overlapping
device range raises `bus.BusError`; an access outside RAM raises `errors.GuestMemoryError`;
a run that outlives its timeout raises `RunTimeout` (with the vCPU's state in the message).

Stability: the names in `__all__` and their signatures are the API; everything reached
through the attributes documented as "the underlying part" is the product's internals, free
to change.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from contextlib import ExitStack
from types import TracebackType
from typing import TextIO

from . import layout
from .allocator import ResourceAllocator
from .boot.entry import BootEntry, CpuMode, Registers, setup_entry
from .bus import Bus, BusDevice, BusDeviceRange
from .exit_handler import Stop
from .fallback import EmulationFallbacks
from .kvm import Kvm
from .kvm_interrupts import IsaLine, KvmInterrupts, KvmMsiRoute
from .memory import GuestMemory
from .stats import MachineStats, VcpuStats
from .vcpu import KICK_SIGNAL, VcpuLoop, install_kick_handler
from .vcpu_setup import apply_entry, setup_cpuid

__all__ = ["BareVm", "Device", "RunTimeout", "Stop", "VcpuStats", "MachineStats", "IsaLine", "KvmMsiRoute"]

REAL_MODE_LIMIT = 1 << 20  # real mode addresses 1 MiB (segment << 4 + 16-bit offset)
# Long mode enters through the product's boot GDT and identity page tables, written into RAM:
# the RAM must hold them (layout.BOOT_GDT and layout.PAGE_TABLES, below 64 KiB).
LONG_MODE_MIN_RAM = layout.PAGE_TABLES.end


# What a bus calls on a guest access to a registered range: `read(offset, size) -> int` and
# `write(offset, size, value)`, `offset` relative to the range's base, `size` 1, 2, 4 or 8 bytes,
# values little-endian (a read is masked to `size` by the bus). Both run on the vCPU thread
# while the guest waits in the exit.
Device = BusDevice


class RunTimeout(Exception):
    """The guest did not stop within the timeout; the message holds the vCPU's state."""


class BareVm:
    """One VM, one vCPU, `ram_size` bytes of RAM at GPA 0, a PIO and an MMIO bus.

    `cpus=N` adds application processors: vCPU 1..N-1 (APIC IDs 1..N-1), each on its own thread,
    which KVM keeps in wait-for-SIPI (KVM_MP_STATE_UNINITIALIZED) until the guest starts them
    with INIT and start-up IPIs through its local APIC (Intel SDM vol. 3, 8.4.4 "MP
    Initialization Example"); only vCPU 0 gets the `start_*_mode` entry state. Needs the irqchip.

    `irqchip=True` creates KVM's in-kernel PICs, IOAPIC and a local APIC per vCPU (what the
    machine has): interrupts can then be delivered (`msi_route`, `irq_line`), but HLT no longer
    exits to the VMM (the in-kernel LAPIC waits for an interrupt instead), so such a guest ends
    by writing to a device that calls `stop`. Without it, HLT with interrupts off ends the run.

    `trace` (a text stream) receives one line per exit, as `minivmm run --trace` prints them.
    The VM owns host resources (file descriptors, memory): `close` it, or use it as a context
    manager.
    """

    def __init__(self, ram_size: int = 2 << 20, *, irqchip: bool = True, trace: TextIO | None = None, cpus: int = 1) -> None:
        if ram_size <= 0 or ram_size % 0x1000:
            raise ValueError(f"ram_size must be a positive multiple of 4 KiB, not {ram_size:#x}")
        if not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1 or (cpus > 1 and not irqchip):
            raise ValueError(f"cpus={cpus!r}: a whole number, at least 1, and more than 1 needs irqchip=True (INIT/SIPI go through the local APIC)")
        install_kick_handler()  # so a timeout can interrupt KVM_RUN (main thread only; a no-op elsewhere)
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            # Without the handler a kick (a timeout, close) would kill the whole process.
            raise ValueError("create the first BareVm on the main thread: its vCPU kick signal needs a handler")
        self.created = time.monotonic()
        self._owned = ExitStack()  # every host resource, released in reverse by close()
        try:
            self._create(ram_size, irqchip, trace, cpus)
        except BaseException:
            self._owned.close()
            raise
        self._closed = False

    def _create(self, ram_size: int, irqchip: bool, trace: TextIO | None, cpus: int) -> None:
        self.kvm = Kvm()  # the underlying part: /dev/kvm
        self._owned.callback(self.kvm.close)
        if cpus > (kvm_max := self.kvm.max_vcpus()):
            raise ValueError(f"cpus={cpus}: this KVM allows at most {kvm_max} vCPUs")
        # The machine's allocator; a bare VM takes only memory slots and GSIs from it (its
        # address windows depend on a RAM size a machine may have, hence the minimum).
        self.resources = ResourceAllocator(max(ram_size, layout.MIN_MEM_SIZE), max_memory_slots=self.kvm.max_memory_slots())
        self.vm = self.kvm.create_vm()  # the underlying part: the KVM VM
        self._owned.callback(self.vm.close)
        # Intel VMX needs these pages for real mode and EPT; the machine's addresses (layout.py).
        self.vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
        self.vm.set_tss_addr(layout.TSS_ADDR)
        self.interrupts: KvmInterrupts | None = None
        if irqchip:
            self.vm.create_irqchip()
            self.interrupts = KvmInterrupts(self.vm, self.resources.gsis)
        self.mem = GuestMemory.anonymous(ram_size)  # guest RAM: read/write it with mem.read/write/read_int...
        region = self.mem.regions[0]
        region.slot = self.resources.memory_slots.allocate()
        self.vm.map_memory(region.slot, region.gpa, region.mapping, region.size)
        self.pio = Bus("pio")  # port I/O: 0..0xFFFF
        self.mmio = Bus("mmio")  # guest-physical addresses outside RAM
        self.vcpus = []  # the underlying parts: KVM vCPUs
        for i in range(cpus):
            self.vcpus.append(self.vm.create_vcpu(i))
            self._owned.callback(self.vcpus[-1].close)
        self.vcpu = self.vcpus[0]  # the boot processor
        self.stops: list[Stop] = []
        self._stopped = threading.Event()
        self.loops = [VcpuLoop(v, self.mem, self.pio, self.mmio, EmulationFallbacks(), self._on_stop, trace) for v in self.vcpus]
        self.loop = self.loops[0]
        self.entry: BootEntry | None = None  # the long-mode entry state, once applied
        self._routes: list[KvmMsiRoute] = []
        self._owned.callback(self._close_routes)
        self._owned.callback(self._end_threads)  # first at close: no thread may still use a vCPU

    # -- memory --------------------------------------------------------------------------------
    @property
    def ram_size(self) -> int:
        return self.mem.regions[0].size

    def load(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy `data` into guest RAM at `gpa` (GuestMemoryError if it does not fit)."""
        self.mem.write(gpa, bytes(data))

    # -- devices -------------------------------------------------------------------------------
    def add_port_device(self, port: int, size: int, device: Device, name: str | None = None) -> BusDeviceRange:
        """Attach `device` to ports `port`..`port + size - 1`; `name` is what statistics and
        traces call it (default: its class name). BusError if the range overlaps another."""
        if port < 0 or size <= 0 or port + size > 0x10000:
            raise ValueError(f"ports {port:#x}+{size:#x} are outside 0..0xffff")
        return self.pio.register(port, size, device, name)

    def add_mmio_device(self, gpa: int, size: int, device: Device, name: str | None = None) -> BusDeviceRange:
        """Attach `device` to guest-physical `gpa`..`gpa + size - 1` (outside RAM: an access to
        RAM never exits). ValueError if the range overlaps RAM, BusError if another device."""
        if gpa < self.ram_size:
            raise ValueError(f"MMIO range {gpa:#x}+{size:#x} overlaps RAM (0..{self.ram_size:#x})")
        return self.mmio.register(gpa, size, device, name)

    # -- interrupts (irqchip=True) ---------------------------------------------------------------
    def _chip(self) -> KvmInterrupts:
        if self.interrupts is None:
            raise ValueError("interrupts need the in-kernel irqchip: BareVm(irqchip=True)")
        return self.interrupts

    def msi_route(self, address: int, data: int) -> KvmMsiRoute:
        """An MSI route (a GSI routed to the message, fed by an irqfd), unmasked: each
        `route.trigger()` - from any thread, or a device writing `route.eventfd` - makes KVM
        deliver the message without the VMM's vCPU thread. `address`/`data` are the MSI
        message (Intel SDM vol. 3, 10.11: 0xFEE00000 | apic_id << 12, data = vector)."""
        route = self._chip().msi_route()
        self._routes.append(route)
        route.set_message(address, data)
        route.set_masked(False)
        return route

    def irq_line(self, pin: int) -> IsaLine:
        """ISA interrupt line `pin` (0-15) of the in-kernel PIC and IOAPIC: `set_level(True/False)`."""
        if not 0 <= pin < layout.PIC_NUM_PINS:
            raise ValueError(f"ISA IRQ {pin} is not 0..{layout.PIC_NUM_PINS - 1}")
        return self._chip().irq_line(pin)

    # -- the vCPU's entry state ----------------------------------------------------------------
    def start_real_mode(self, code: int, sp: int = 0x8000) -> None:
        """Start in real mode at `code` (CS = code >> 4, IP = 0), with DS = ES = SS = 0 (data
        addresses are GPAs below 64 KiB) and SP = `sp`. `code` must be 16-byte aligned, below 1 MiB."""
        if code % 16 or not 0 <= code < REAL_MODE_LIMIT:
            raise ValueError(f"real-mode code address {code:#x} must be 16-byte aligned and below 1 MiB")
        sregs = self.vcpu.get_sregs()
        for seg in (sregs.ds, sregs.es, sregs.ss):
            seg.base, seg.selector = 0, 0
        sregs.cs.base, sregs.cs.selector = code, code >> 4
        self.vcpu.set_sregs(sregs)
        regs = self.vcpu.get_regs()
        regs.rip, regs.rflags, regs.rsp = 0, 2, sp
        self.vcpu.set_regs(regs)

    def start_long_mode(self, rip: int, rsp: int = 0x8000) -> BootEntry:
        """Enter 64-bit long mode at `rip` the way the machine enters a bzImage: the product's
        boot GDT (layout.BOOT_GDT) and identity page tables mapping 4 GiB with 2 MiB pages
        (layout.PAGE_TABLES), written into RAM, CS = __BOOT_CS, an empty IDT, interrupts off.
        Returns the entry state applied. ValueError if RAM cannot hold the tables."""
        if self.ram_size < LONG_MODE_MIN_RAM:
            raise ValueError(f"long mode needs at least {LONG_MODE_MIN_RAM:#x} bytes of RAM for the page tables")
        self.entry = setup_entry(self.mem, CpuMode.LONG64, Registers(rip=rip, rsp=rsp))
        apply_entry(self.vcpu, self.entry)
        return self.entry

    def set_cpuid(self) -> None:
        """Give the vCPU the CPUID the machine gives its boot vCPU (what KVM supports, plus the
        hypervisor bit); a fresh vCPU has none (no FXSR, no SSE...)."""
        supported = self.kvm.supported_cpuid()
        for vcpu in self.vcpus:
            setup_cpuid(vcpu, supported, vcpu.index)

    # -- running ---------------------------------------------------------------------------------
    def stop(self, status: int = 0, reason: str = "stopped by a device") -> None:
        """End the run (from a device, on any vCPU thread): `run` returns Stop(status, reason)."""
        self._on_stop(Stop(status, reason))

    def _on_stop(self, stop: Stop) -> None:
        # The first stop of any vCPU ends every vCPU's loop.
        self.stops.append(stop)
        self._stopped.set()
        for loop in self.loops:
            loop.kick()

    def run(self, timeout: float = 5.0) -> Stop:
        """Run each vCPU on its own thread until the run stops: a device called `stop`, HLT with
        interrupts off (without irqchip), a triple fault, an unhandled failure. Returns why.
        A VM runs once. RunTimeout if it has not stopped after `timeout` seconds."""
        self._check_open()
        if self.loop.thread is not None:
            raise ValueError("a BareVm runs once")
        for loop in self.loops:
            loop.start()
        if not self._stopped.wait(timeout):
            self._end_threads()
            raise RunTimeout(f"the guest did not stop within {timeout:g} s:\n" + self.describe())
        self._end_threads()
        return self.stops[0]

    def _end_threads(self) -> None:
        for loop in self.loops:
            if loop.thread is not None and loop.thread.is_alive():
                loop.kick()
                loop.thread.join(5)

    # -- what happened ---------------------------------------------------------------------------
    def registers(self, cpu: int = 0):
        """vCPU `cpu`'s general registers (`struct kvm_regs`: rax, rbx, ..., rip, rflags). Read
        them before `run` or after it returned, never while the guest runs."""
        self._check_open()
        return self.vcpus[cpu].get_regs()

    @property
    def stats(self) -> VcpuStats:
        """The vCPU's live exit statistics: `by_kind` (KVM exit name -> count), `by_device`
        (bus range name, or "unclaimed" -> count), `time_in_run`/`time_outside` in seconds."""
        return self.loop.stats

    def statistics(self) -> MachineStats:
        """A snapshot in the form `minivmm run --stats` prints (`render_text()`) and
        `--stats-json` writes (`to_json()`), including unclaimed accesses per bus."""
        stop = self.stops[0] if self.stops else None
        return MachineStats(
            vcpus=[loop.stats.copy() for loop in self.loops],
            wall_time=time.monotonic() - self.created,
            process_start=self.created,
            fallbacks=dict(sum((loop.fallbacks.counts for loop in self.loops), Counter())),
            unclaimed={bus.name: dict(bus.unclaimed) for bus in (self.pio, self.mmio)},
            stop_status=None if stop is None else stop.status,
            stop_reason=None if stop is None else stop.reason,
        )

    def describe(self) -> str:
        """Each vCPU's registers, instruction bytes at RIP and last exits (after `run`)."""
        self._check_open()
        return "\n".join(loop.describe() for loop in self.loops)

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the vCPU threads that still run and release every host resource; closing
        again does nothing. After it, `run` and `registers` raise ValueError."""
        self._closed = True
        self._owned.close()

    def _close_routes(self) -> None:
        for route in self._routes:
            route.close()
        self._routes.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this BareVm is closed")

    def __enter__(self) -> BareVm:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
