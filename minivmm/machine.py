"""Assemble a VM from its parts and run it: memory, irqchip, devices, boot, vCPUs, event loop.

`Machine.run()` returns the exit status. The run ends when a device or a vCPU calls
`request_stop` (poweroff, reboot, panic, triple fault, an unhandled exit) or on a signal.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import hostcheck, layout, pmemfile, vcpu_setup
from .allocator import ResourceAllocator
from .boot import Boot, BootProtocol, build_acpi, configure_boot, load_image
from .boot.acpi import S5_SLP_TYP, PciSlots
from .bus import Bus
from .devices.acpi_ged import GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON, GenericEventDevice
from .devices.acpi_pm import AcpiSleepRegisters
from .devices.console import Console
from .devices.i8042 import I8042
from .devices.pci_hotplug import PciHotplugController
from .devices.pvpanic import PvPanic
from .devices.serial import Serial16550
from .devices.virtio.pci import VirtioPciDevice
from .devices.virtio.pmem import VirtioPmem
from .disasm import LazySymbols
from .errors import UserError
from .eventloop import EventLoop
from .fallback import EmulationFallbacks
from .kvm_interrupts import KvmInterrupts
from .kvm import Kvm
from .memory import GuestMemory, Region
from .monitor.monitor import Monitor
from .monitor.qmp import QmpServer, listen_unix
from .pci import PciHostBridge
from .pmemfile import PmemBacking, PmemSpec
from .powerfail import PAGE_SIZE, DirtyPageCopier
from .profiler import Profiler, ProfileSymbols, load_system_map, sampling_warning
from .flushlog import FlushLogWriter
from .register_block import Register, RegisterBlock
from .exit_handler import Stop
from .stats import MachineStats, PmemDeviceStats
from .timeline import MilestoneScanner
from .vcpu import VcpuLoop, install_kick_handler

# Guest RAM is reserved lazily, page by page as the guest touches it (Python < 3.12 lacks the name).
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def process_start_monotonic() -> float:
    """This process's start time on the CLOCK_MONOTONIC scale (from /proc/self/stat, in ticks
    since boot; CLOCK_BOOTTIME minus CLOCK_MONOTONIC corrects for time spent suspended)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    since_boot = ticks / os.sysconf("SC_CLK_TCK")
    return since_boot - (time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic())


def anonymous_ram(size: int) -> mmap.mmap:
    """`size` bytes of anonymous memory, reserved lazily (UserError if the host refuses)."""
    try:
        return mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    except OSError as exc:
        raise UserError(f"cannot reserve {size >> 20} MiB of guest RAM: {exc.strerror}") from None


def check_kernel(kernel: Path, mem_size: int, boot: BootProtocol = BootProtocol.LINUX) -> None:
    """Load `kernel` into scratch memory with the code `Machine` boots it with, so a kernel it
    would refuse is refused (UserError) before a machine creates or changes any file."""
    size = min(mem_size, layout.LOW_RAM_MAX)  # the loaders write below 4 GiB only
    scratch = GuestMemory()  # unmapped when dropped (its views into the mapping go with it)
    scratch.add_region(Region(0, size, anonymous_ram(size), "scratch"))
    load_image(scratch, kernel, mem_size, boot)


@dataclass
class MachineConfig:
    """What to build: plain data (paths and sizes; nothing opened). `Machine` acquires it all."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""
    boot: BootProtocol = BootProtocol.LINUX  # how a vmlinux is entered (--boot): LINUX or PVH
    mem_size: int = layout.DEFAULT_MEM_SIZE
    hotplug_slots: int = layout.PCI_HOTPLUG_SLOTS_DEFAULT  # free PCI slots declared for hot-add at boot
    cpus: int = 1
    trace: bool = False
    trace_only: frozenset[str] = frozenset()  # --trace=LIST: trace only these kinds/devices (empty: all)
    watchdog: float | None = None
    pmem: list[PmemSpec] = field(default_factory=list)
    qmp: str | None = None  # QMP socket path
    timeline: bool = False  # record per-interval counters, console milestones and pmem flushes (--timeline)
    profile_hz: int | None = None  # sample the guest's RIP this often (--profile); None: no profiler
    profile_map: Path | None = None  # System.map to name the sampled functions (--profile-map)
    stdin_fd: int = 0
    stdout_fd: int = 1


class Machine:
    """One VM: owns every fd, mapping, thread and file it uses, and releases them all.

    Everything is acquired in `__init__`/`run` through one `ExitStack` (`self.owned`) and
    released in reverse order by `close()` (or leaving the `with` block), on every path:
    a failure half-way through `__init__` releases what was acquired so far."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.owned = ExitStack()
        self.loops: list[VcpuLoop] = []
        self._listeners: list[Callable[[str, dict[str, object]], None]] = []
        self._paused = False
        self._stop: Stop | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self.pmem_backings: list[PmemBacking] = []
        self.pmem_failures: dict[str, str] = {}  # device id -> why its pages could not be backed
        self.copiers: list[DirtyPageCopier] = []  # flush targets of the lose-unflushed devices
        self.profiler: Profiler | None = None  # --profile
        try:
            self._assemble()
        except BaseException:
            self.owned.close()
            for backing in self.pmem_backings:
                backing.rollback()  # a refused run leaves no file created or extended
            raise
        self.started_at = time.monotonic()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release everything, last acquired first (idempotent)."""
        self.owned.close()

    def _assemble(self) -> None:
        cfg, own = self.config, self.owned
        # Backing files are checked (and created or extended) before KVM is touched, all or none;
        # the whole layout, the kernel and the profiler's map are checked before any file is.
        if not 1 <= cfg.cpus <= layout.MAX_VCPUS:
            raise UserError(f"{cfg.cpus} vCPUs: a machine has 1 to {layout.MAX_VCPUS}")
        warnings = pmemfile.check_plan(cfg.pmem, cfg.mem_size)
        self._load_profile_map()
        self.pmem_backings = pmemfile.open_all(cfg.pmem)
        for backing in self.pmem_backings:
            own.callback(backing.close)
        for warning in warnings + pmemfile.sparse_warnings(self.pmem_backings):
            print(f"minivmm: warning: {warning}", file=sys.stderr)
        ram = [(gpa, self._reserve_ram(size)) for gpa, size in layout.ram_ranges(cfg.mem_size)]
        self.kvm = Kvm()
        own.callback(self.kvm.close)
        self.host = hostcheck.probe()
        if cfg.cpus > (kvm_max := self.kvm.max_vcpus()):
            raise UserError(f"{cfg.cpus} vCPUs: this host's KVM allows at most {kvm_max}")
        self.vm = self.kvm.create_vm()
        own.callback(self.vm.close)
        self.resources = ResourceAllocator(cfg.mem_size, max_memory_slots=self.kvm.max_memory_slots())
        # Pages Intel VMX needs for real-mode emulation, clear of RAM and every window (layout).
        self.vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
        self.vm.set_tss_addr(layout.TSS_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        self.interrupts = KvmInterrupts(self.vm, self.resources.gsis)
        self.mem = GuestMemory()
        for gpa, mapping in ram:
            self.add_region(Region(gpa, len(mapping), mapping, "ram"))
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.events = EventLoop()
        own.callback(self.events.close)
        self.fallbacks = EmulationFallbacks()
        self._add_platform_devices()
        self._add_pci_devices()
        self.monitor = Monitor(self)
        self.qmp: QmpServer | None = None
        if cfg.qmp is not None:
            self.qmp = QmpServer(listen_unix(cfg.qmp), self.monitor, cfg.qmp)
            own.callback(self.qmp.close)

    def _load_profile_map(self) -> None:
        # Read (and refused, a UserError) before any pmem or flush-log file is touched.
        cfg = self.config
        self._system_map = load_system_map(cfg.profile_map) if cfg.profile_map is not None else None

    # -- memory ---------------------------------------------------------------------------
    def _reserve_ram(self, size: int) -> mmap.mmap:
        mapping = anonymous_ram(size)
        self.owned.callback(mapping.close)
        return mapping

    def add_region(self, region: Region) -> Region:
        """Add a region to the guest-physical map and give it a KVM memory slot."""
        self.mem.add_region(region)
        self.owned.callback(region.view.release)  # before its mapping closes (LIFO)
        region.slot = self.resources.memory_slots.allocate()
        self.vm.map_memory(region.slot, region.gpa, region.mapping, region.size, region.readonly, region.log_dirty)
        return region

    # -- devices --------------------------------------------------------------------------
    def _add_platform_devices(self) -> None:
        self.console = Console(
            self.events,
            on_quit=lambda: self.request_stop(Stop(0, "quit from the console (Ctrl-A x)", "host-ui")),
            on_power_cut=self.power_cut,
            stdin_fd=self.config.stdin_fd,
            stdout_fd=self.config.stdout_fd,
            monitor=lambda line: self.monitor.hmp.execute(line),
        )
        self.serial = Serial16550(self.interrupts.irq_line(layout.COM1_IRQ), output=self.console.write)
        self.console.attach(self.serial)
        if self.config.timeline:
            self.console.milestones = MilestoneScanner()
        self.pio.register(layout.COM1_PORT, layout.COM1_PORT_COUNT, self.serial, "serial")
        self.i8042 = I8042(on_reset=lambda: self.request_stop(Stop(0, "guest rebooted (i8042 reset)", "guest-reset")))
        self.pio.register(layout.I8042_DATA_PORT, 1, self.i8042.data_port, "i8042")
        self.pio.register(layout.I8042_COMMAND_PORT, 1, self.i8042.command_port, "i8042")
        self.acpi_pm = AcpiSleepRegisters(on_sleep=self._on_sleep)
        self.pio.register(layout.ACPI_SLEEP_CONTROL_PORT, 2, self.acpi_pm, "acpi-sleep")
        self.pvpanic = PvPanic(on_panic=lambda: self.request_stop(Stop(1, "guest kernel panicked (pvpanic)", "guest-panic")))
        self.pio.register(layout.PVPANIC_PORT, 1, self.pvpanic, "pvpanic")
        self.ged = GenericEventDevice(self.interrupts.irq_line(layout.GED_GSI))
        self.pio.register(layout.GED_PORT, layout.GED_PORT_COUNT, self.ged, "acpi-ged")
        # Linux's io_delay writes to the POST port; claim it so those don't count as unclaimed.
        self.pio.register(layout.POST_PORT, 1, RegisterBlock((Register(0, 1, "POST", lambda: 0xFF),)), "post")

    def _add_pci_devices(self) -> None:
        self.pci = PciHostBridge(self.mmio, self.interrupts, self.resources.mmio32, self.resources.mmio64, intx=self.interrupts)
        self.pio.register(layout.PCI_CONFIG_ADDRESS_PORT, layout.PCI_CONFIG_PORT_COUNT, self.pci.conf1, "pci-conf1")
        self.pci_hotplug = PciHotplugController()
        self.pio.register(layout.PCI_HOTPLUG_PORT, layout.PCI_HOTPLUG_PORT_COUNT, self.pci_hotplug, "pci-hotplug")
        self._hotplug_lock = threading.Lock()  # one hot-add at a time
        self.pmem_plugged: list[tuple[VirtioPmem, PmemBacking]] = []  # in plug order
        for spec, backing in zip(self.config.pmem, self.pmem_backings):
            if spec.plug:
                self.add_pmem(backing)

    def add_pmem(self, backing: PmemBacking) -> VirtioPmem:
        """Map a backing file above RAM as a KVM memory slot and plug a virtio-pmem-pci device
        describing it (virtio 1.2 §5.19: the device config holds that start and size).

        Raises UserError when the pmem window has no room, no KVM memory slot is free, PCI
        bus 0 is full or KVM refuses the slot; then nothing is left allocated, mapped or plugged."""
        return self._plug_pmem(backing)[0]

    def _plug_pmem(self, backing: PmemBacking, *, own_backing: bool = False) -> tuple[VirtioPmem, int]:
        """`add_pmem`, returning the device and its PCI slot; with `own_backing` the machine
        closes `backing` at the end (after the device and its memory are gone)."""
        with ExitStack() as undo:
            window = self.resources.pmem.allocate(backing.size, layout.PMEM_ALIGN, backing.id)
            undo.callback(self.resources.pmem.free, window)
            region = Region(window.base, backing.size, backing.mapping, name=backing.id, readonly=backing.readonly,
                            file=backing.path, log_dirty=backing.lose_unflushed)
            undo.callback(region.view.release)
            region.slot = self.resources.memory_slots.allocate()
            undo.callback(self.resources.memory_slots.free, region.slot)
            copier = self._dirty_page_copier(backing, region) if backing.lose_unflushed else None
            if copier is not None:
                undo.callback(copier.close)
            device = VirtioPmem.from_backing(backing, start=window.base, flush_target=copier)
            device.flush_times = [] if self.config.timeline else None
            region.on_fault = lambda reason: self._pmem_failed(device, backing.id, reason)
            transport = VirtioPciDevice(device, self.mem, self.interrupts, name=backing.id)
            undo.callback(transport.close)
            pci_slot = self.pci.add_device(transport)
            undo.callback(self.pci.remove_device, pci_slot)
            try:
                self.vm.map_memory(region.slot, region.gpa, region.mapping, region.size, region.readonly, region.log_dirty)
            except OSError as exc:
                raise UserError(f"{backing.id}: KVM refused the memory slot for {backing.path}: {exc.strerror}") from None
            undo.callback(self.vm.set_user_memory_region, region.slot, region.gpa, 0, 0)  # size 0 deletes the slot
            self.mem.add_region(region)
            undo.pop_all()  # plugged: from here on the machine owns it all
        if own_backing:
            self.owned.callback(backing.close)
        self.owned.callback(region.view.release)  # before its mapping closes (LIFO)
        if copier is not None:
            self.owned.callback(copier.close)  # after the device's flusher thread stopped (LIFO)
            self.copiers.append(copier)
        self.owned.callback(transport.close)  # stops its flusher thread before guest memory goes away
        self.pmem_plugged.append((device, backing))
        return device, pci_slot

    def _declare_pci_slots(self) -> PciSlots:
        """The PCI slots the DSDT describes (at boot): _PRT routing for the occupied slots and the
        lowest `config.hotplug_slots` free ones, which also get ACPI hotplug objects; from then
        on only those can be hot-added (README "Hotplug")."""
        with self._hotplug_lock:  # a monitor's hot-add now is a cold plug: it lands in `routed`
            hotplug = tuple(self.pci.free_slots()[: self.config.hotplug_slots])
            self.pci_hotplug.slots = hotplug
            return PciSlots(routed=tuple(sorted(set(self.pci.devices) | set(hotplug))), hotplug=hotplug)

    def hotplug_pmem(self, backing: PmemBacking) -> VirtioPmem:
        """Plug a virtio-pmem-pci device for `backing` into the running guest (README "Hotplug").

        Placed by the same rules as a cold-plugged one (`add_pmem`): a 128 MiB aligned range of
        the pmem window, a new KVM memory slot (KVM_SET_USER_MEMORY_REGION works while vCPUs
        run), the lowest free slot of PCI bus 0. Then the PCI hotplug controller records the
        slot and the GED raises its interrupt: the guest's _EVT notifies that slot's ACPI
        object and acpiphp scans it, so /dev/pmemN appears with nothing done in the guest.

        Safe from any thread while the vCPUs run; one hot-add at a time. On success the
        machine owns `backing` (it is closed with the machine, never unplugged). Raises
        UserError (no room in the pmem window, no free KVM memory slot, PCI bus 0 full, no
        hot-pluggable slot left, KVM refused the slot):
        then nothing changed, and `backing` is still the caller's to close."""
        with self._hotplug_lock:
            free = self.pci.free_slots()
            if free and free[0] not in self.pci_hotplug.slots:  # full: _plug_pmem says so
                raise UserError(
                    f"{backing.id}: no hot-pluggable PCI slot left: the guest was given "
                    f"{len(self.pci_hotplug.slots)} at boot (--hotplug-slots)"
                )
            device, pci_slot = self._plug_pmem(backing, own_backing=True)
            self.pci_hotplug.slot_added(pci_slot)
            self.ged.notify(GED_EVENT_PCI_HOTPLUG)
        return device

    def power_button(self) -> None:
        """Press the ACPI power button: the GED's _EVT sends Notify (\\_SB.PWRB, 0x80) and
        Linux's button driver reports KEY_POWER on its "Power Button" input device. The default
        guest's /init then flushes and powers off (ACPI S5), which ends the run with status 0.

        Safe from any thread; returns at once. A guest without a button driver, or that
        ignores the key, keeps running: the caller decides how long to wait."""
        self.ged.notify(GED_EVENT_POWER_BUTTON)

    def _pmem_failed(self, device: VirtioPmem, ident: str, reason: str) -> None:
        """A guest access to the device's pages could not be backed (`exit_handler`): its data
        may be lost, so no later FLUSH may report success: the device's flushes fail from now on."""
        self.pmem_failures.setdefault(ident, reason)
        device.fail_flushes(errno.EIO, "backing a guest page")

    def _dirty_page_copier(self, backing: PmemBacking, region: Region) -> DirtyPageCopier:
        """The flush target of a lose-unflushed device: copies the pages KVM logged as dirty."""
        log = FlushLogWriter(backing.flush_log, PAGE_SIZE, backing.size, backing.fd) if backing.flush_log else None
        npages = region.size // PAGE_SIZE
        return DirtyPageCopier(backing.fd, region.view, lambda: self.vm.get_dirty_log(region.slot, npages), log)

    def power_cut(self) -> int:
        """Cut the power (Ctrl-A p, QMP x-power-cut): end the run at once with no final flush;
        returns how many pages the guest had dirtied in lose-unflushed devices since their last
        flush, which never reach the files. A flush in progress completes first."""
        for copier in self.copiers:
            copier.cut_power()  # from here every flush fails: nothing more reaches a file
        self.request_stop(Stop(0, "power cut", "host-power-cut"))
        dropped = sum(copier.dropped_pages() for copier in self.copiers)
        print(f"minivmm: power cut: {dropped} dirty pmem page(s) dropped", file=sys.stderr)
        return dropped

    def _on_sleep(self, slp_typ: int) -> None:
        if slp_typ == S5_SLP_TYP:
            self.request_stop(Stop(0, "guest powered off (ACPI S5)", "guest-shutdown"))

    # -- run state and events (the monitor's view) -----------------------------------------
    @property
    def run_state(self) -> str:
        """QEMU's RunState name (qapi/run-state.json): prelaunch, running, paused or shutdown."""
        if self._stop is not None:
            return "shutdown"
        if not self.loops or self.loops[0].thread is None:
            return "prelaunch"
        return "paused" if self._paused else "running"

    def add_event_listener(self, listener: Callable[[str, dict[str, object]], None]) -> None:
        """`listener(name, data)` hears every QMP event the machine emits (any thread)."""
        self._listeners.append(listener)

    def emit(self, event: str, data: dict[str, object] | None = None) -> None:
        for listener in list(self._listeners):
            listener(event, data or {})

    def pause(self, timeout: float = 5.0) -> None:
        """Stop every vCPU outside KVM_RUN (QMP `stop`); device threads keep serving."""
        if self._paused:
            return
        self._paused = True
        for loop in self.loops:
            loop.pause()
        for loop in self.loops:
            if loop.thread is not None and loop.thread.is_alive():
                loop.paused.wait(timeout)
        self.emit("STOP")

    def resume(self) -> None:
        """Let every vCPU run again (QMP `cont`)."""
        if not self._paused:
            return
        self._paused = False
        for loop in self.loops:
            loop.resume()
        self.emit("RESUME")

    # -- stop -----------------------------------------------------------------------------
    def request_stop(self, stop: Stop) -> None:
        """End the run (first caller wins); safe from any thread and from signal handlers."""
        with self._stop_lock:
            if self._stop is None:
                self._stop = stop
        for loop in self.loops:
            loop.kick()
        self._stopped.set()

    # -- boot -----------------------------------------------------------------------------
    def _boot(self) -> None:
        cfg = self.config
        rsdp = build_acpi(self.mem, cfg.cpus, cfg.mem_size, slots=self._declare_pci_slots())
        loaded = load_image(self.mem, cfg.kernel, cfg.mem_size, cfg.boot)
        cmdline = cfg.cmdline
        if self.host.software_kvm:  # an image of unknown SMP-ness gets the SMP remedies
            cmdline = f"{cmdline} {hostcheck.software_kvm_cmdline(loaded.smp is not False)}".strip()
        self.boot = Boot(loaded, configure_boot(self.mem, loaded, cfg.initrd, cmdline, cfg.mem_size, rsdp))
        if cfg.trace:
            for base, size, name in layout.describe(cfg.mem_size):
                print(f"map: {base:#014x} +{size:#x} {name}", file=sys.stderr)
            for region in self.mem.regions:
                print(f"map: {region.gpa:#014x} +{region.size:#x} slot {region.slot} {region.name}", file=sys.stderr)
            for line in self.boot.describe():
                print(line, file=sys.stderr)
        self.symbols = LazySymbols(cfg.kernel)  # read only if an instruction is ever shown
        supported = self.kvm.supported_cpuid()
        for index in range(cfg.cpus):  # vCPU n has local APIC id n, as the MADT says
            vcpu = self.vm.create_vcpu(index)
            self.owned.callback(vcpu.close)
            vcpu_setup.setup_vcpu(vcpu, supported, self.boot.entry if index == 0 else None, self.host.hidden_kvm_features)
            trace = sys.stderr if cfg.trace else None
            self.loops.append(
                VcpuLoop(vcpu, self.mem, self.pio, self.mmio, self.fallbacks, self.request_stop, trace,
                         trace_only=cfg.trace_only, symbols=self.symbols)
            )
            if cfg.timeline:
                self.loops[-1].record_timeline()
        if cfg.profile_hz is not None:
            self.profiler = Profiler(self.loops, cfg.profile_hz, ProfileSymbols(self.symbols, self._system_map, cfg.profile_map))
            if warning := sampling_warning(cfg.profile_hz, cfg.cpus, self.host.software_kvm):
                print(f"minivmm: warning: {warning}", file=sys.stderr)

    def run(self) -> Stop:
        """Boot and run the guest until it ends; returns why it ended."""
        install_kick_handler()
        self._boot()
        if self.host.notice:  # once, and only for a guest that actually starts
            print(f"minivmm: {self.host.notice}", file=sys.stderr)
        old_handlers = self._install_signal_handlers()
        self.events.start()
        if self.qmp is not None:
            self.qmp.start()
        try:
            with self.console:  # raw terminal while the guest runs; restored whatever happens
                # Every vCPU gets its thread now: an application processor's KVM_RUN waits in
                # the kernel (wait-for-SIPI) until the guest starts it through its local APIC.
                for loop in self.loops:
                    loop.start()
                if self.profiler is not None:
                    self.profiler.start()
                try:
                    self._wait()
                finally:
                    if self.profiler is not None:
                        self.profiler.stop()
                    for loop in self.loops:
                        loop.kick()
                    for loop in self.loops:
                        if loop.thread is not None:
                            loop.thread.join(timeout=5)
        finally:
            self.events.stop()
            self._restore_signal_handlers(old_handlers)
        assert self._stop is not None
        self.emit("SHUTDOWN", {"guest": self._stop.cause.startswith("guest-"), "reason": self._stop.cause})
        return self._stop

    def _wait(self) -> None:
        last_progress = time.monotonic()
        last_exits = -1
        while not self._stopped.wait(0.5):
            if self.config.watchdog is None or self._paused:
                last_exits = -1  # a paused guest makes no progress on purpose
                continue
            exits = sum(sum(loop.stats.by_kind.values()) for loop in self.loops)
            if self.profiler is not None:  # the profiler's kicks (EINTR exits) are no guest progress
                exits -= sum(loop.stats.by_kind["intr"] for loop in self.loops)
            now = time.monotonic()
            if exits != last_exits:
                last_exits, last_progress = exits, now
            elif now - last_progress > self.config.watchdog:
                for loop in self.loops:
                    loop.request_describe()
                time.sleep(0.2)  # let the vCPU threads print before the stop interrupts them
                self.request_stop(Stop(1, f"watchdog: no exit to the VMM for {self.config.watchdog:g} s"))

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_term(signum: int, frame: object) -> None:
            self.request_stop(Stop(0, f"stopped by {signal.Signals(signum).name}", "host-signal"))

        def on_usr1(signum: int, frame: object) -> None:
            for loop in self.loops:
                loop.request_describe()

        handlers = {signal.SIGINT: on_term, signal.SIGTERM: on_term, signal.SIGUSR1: on_usr1}
        return {sig: signal.signal(sig, h) for sig, h in handlers.items()}

    @staticmethod
    def _restore_signal_handlers(old: dict) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    # -- statistics -------------------------------------------------------------------------
    def statistics(self) -> MachineStats:
        """A snapshot of the run's statistics (exits, times, fallbacks, unclaimed accesses, pmem)."""
        return MachineStats(
            vcpus=[loop.stats.copy() for loop in self.loops],
            wall_time=time.monotonic() - self.started_at,
            process_start=process_start_monotonic(),
            fallbacks=dict(self.fallbacks.counts),
            unclaimed={bus.name: dict(bus.unclaimed) for bus in (self.pio, self.mmio)},
            pmem=[PmemDeviceStats(b.id, b.path, dev.stats()) for dev, b in self.pmem_plugged],
            stop_status=None if self._stop is None else self._stop.status,
            stop_reason=None if self._stop is None else self._stop.reason,
            thread_errors=[f"{where}: {type(e).__name__}: {e}" for where, errors in self._thread_error_lists() for e in errors],
            profile=None if self.profiler is None else self.profiler.statistics(),
        )

    def _thread_error_lists(self) -> list[tuple[str, list[BaseException]]]:
        """Where the VMM's own threads keep the exceptions they reported (`errors.report_thread_error`)."""
        lists = [("event loop", self.events.errors)] + [(f"{dev.name} flusher", dev.errors) for dev, _ in self.pmem_plugged]
        if self.qmp is not None:
            lists.append(("QMP", self.qmp.errors))
        if self.profiler is not None:
            lists.append(("profiler", self.profiler.errors))
        return lists
