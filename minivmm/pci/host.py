"""PCI bus 0: the host bridge, configuration mechanism #1 and BAR mapping.

Configuration mechanism #1 (PCI 3.0 section 3.2.2.3.2): CONFIG_ADDRESS is the dword at
I/O port 0xCF8 (bit 31 enable, bits 23:16 bus, 15:11 device, 10:8 function, 7:2 register);
CONFIG_DATA is 0xCFC-0xCFF, accessed with 1, 2 or 4 bytes at any of those ports (the low two
address bits come from the port). Only dword accesses reach CONFIG_ADDRESS; byte and word
accesses to 0xCF8-0xCFB are ignored (Linux's `pci_check_type1` writes a byte to 0xCFB).
A disabled address, another bus, a function other than 0 or an empty slot reads all-ones.

The host bridge function at 00:00.0 has class 0x060000 and IDs 1b36:0008 (Red Hat's generic
"PCIe host bridge" ID, which Linux knows by name and has no quirks for). Its presence makes
Linux's conf1 sanity check (`pci_sanity_check`: a host bridge or VGA class on bus 0) pass.

BAR placement. `add_device` pre-assigns every BAR the way firmware would and enables memory
decoding: 64-bit BARs go to the 64-bit window when one is given (else the 32-bit window),
32-bit BARs to the 32-bit window, each naturally aligned. A Linux guest scanning bus 0 without
ACPI keeps those addresses (`pcibios_allocate_resources` claims them: the root bus spans all
of iomem and the windows hold no RAM), and reassigns them only if it finds a conflict or is
told to (`pci=realloc`); either way this bridge follows whatever the guest writes.

Mapping. For each BAR the bridge registers the device's handler on the MMIO bus at the BAR
address while PCI_COMMAND_MEMORY is set and the address lies inside a window, and attaches
the device's ioeventfds at BAR address + offset. Moving a BAR or clearing the memory bit moves
or removes both. A BAR the guest places outside the windows or on top of another range is
left unmapped and counted in `warnings` (it never raises into the vCPU loop).

INTx routing. Given an `intx` interrupt controller, a function with an interrupt pin is wired
to the GSI `layout.pci_intx_gsi(slot, pin)`, the same swizzle the DSDT's _PRT describes
(level triggered, active low). Slots share the eight GSIs, and a PCI INTx wire is a wired-OR
(PCI 3.0 section 2.2.6), so each GSI is a `SharedIntxLine`: asserted while any function on it
asserts.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

from .. import layout
from ..allocator import AddressAllocator
from ..bus import Bus, BusDeviceRange, BusError
from ..errors import UserError
from ..interrupts import InterruptController, InterruptLine, IoEventRegistry
from .config import BarInfo, PciConfigSpace
from .device import PciDevice
from ..ranges import AddressRange
from .pci_regs import PCI_BASE_ADDRESS_0, PCI_CLASS_BRIDGE_HOST, PCI_COMMAND, PCI_COMMAND_MEMORY, PCI_NUM_BARS

log = logging.getLogger(__name__)

PCI_CONF1_DATA_OFFSET = 4  # CONFIG_DATA follows CONFIG_ADDRESS (0xCF8 / 0xCFC)
PCI_CONF1_ENABLE = 1 << 31
PCI_CONF1_ADDRESS_MASK = PCI_CONF1_ENABLE | 0x00FF_FFFC  # reserved bits 30:24 and 1:0 read 0

PCI_SLOTS = 32
HOST_BRIDGE_VENDOR_ID = 0x1B36  # Red Hat, Inc.
HOST_BRIDGE_DEVICE_ID = 0x0008  # generic PCIe host bridge


def conf1_address(bus: int, device: int, function: int, register: int) -> int:
    """The CONFIG_ADDRESS value selecting a register (as a guest driver builds it)."""
    return PCI_CONF1_ENABLE | bus << 16 | device << 11 | function << 8 | (register & 0xFC)


class HostBridge(PciDevice):
    """The host bridge function at 00:00.0: identification only, no BARs."""

    def __init__(self) -> None:
        super().__init__(
            PciConfigSpace(
                vendor_id=HOST_BRIDGE_VENDOR_ID,
                device_id=HOST_BRIDGE_DEVICE_ID,
                class_code=PCI_CLASS_BRIDGE_HOST,
                subsystem_vendor_id=HOST_BRIDGE_VENDOR_ID,
                subsystem_id=0x1100,
            ),
            "host-bridge",
        )


class Conf1:
    """The PIO device of configuration mechanism #1: 8 ports, CONFIG_ADDRESS then CONFIG_DATA
    (the machine registers it at `layout.PCI_CONFIG_ADDRESS_PORT`)."""

    def __init__(self, bridge: PciHostBridge) -> None:
        self._bridge = bridge
        self.address = 0

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.address
        if offset >= PCI_CONF1_DATA_OFFSET:
            return self._bridge.read_config_at(self.address, offset - PCI_CONF1_DATA_OFFSET, size)
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.address = value & PCI_CONF1_ADDRESS_MASK
        elif offset >= PCI_CONF1_DATA_OFFSET:
            self._bridge.write_config_at(self.address, offset - PCI_CONF1_DATA_OFFSET, size, value)

    def describe(self, offset: int, size: int, value: int, is_write: bool) -> str | None:
        """For `--trace`: "PCI conf1 select 00:02.0 0x10", "PCI conf1 00:02.0 BAR0 sizing",
        "PCI conf1 00:01.0 vendor_id -> 0x1af4" (the address register, then the data port)."""
        if offset == 0 and size == 4:
            return f"PCI conf1 {'select ' + _conf1_where(value) if is_write else 'CONFIG_ADDRESS read'}"
        if offset < PCI_CONF1_DATA_OFFSET:
            return None
        where = _conf1_where(self.address)
        if self._bridge._function(self.address) is None:
            return f"PCI conf1 {where.split()[0]} (no device) {'write dropped' if is_write else '-> all ones'}"
        register = (self.address & 0xFC) + offset - PCI_CONF1_DATA_OFFSET
        name = config_register_name(register)
        if is_write and PCI_BASE_ADDRESS_0 <= register < PCI_BASE_ADDRESS_0 + 4 * PCI_NUM_BARS and value == (1 << (8 * size)) - 1:
            return f"PCI conf1 {where.split()[0]} {name} sizing"
        return f"PCI conf1 {where.split()[0]} {name} {'=' if is_write else '->'} {value:#x}"


CONFIG_HEADER_NAMES = {  # the type-0 header (PCI 3.0 figure 6-1), offset -> field
    0x00: "vendor_id", 0x02: "device_id", 0x04: "command", 0x06: "status", 0x08: "revision_id",
    0x09: "class_prog", 0x0A: "class_device", 0x0C: "cache_line_size", 0x0D: "latency_timer",
    0x0E: "header_type", 0x0F: "bist", 0x28: "cardbus_cis", 0x2C: "subsystem_vendor_id",
    0x2E: "subsystem_id", 0x30: "rom_address", 0x34: "capabilities_pointer",
    0x3C: "interrupt_line", 0x3D: "interrupt_pin", 0x3E: "min_gnt", 0x3F: "max_lat",
}


def config_register_name(register: int) -> str:
    """A config-space offset in the header's words (BARn, vendor_id, ...), else "config 0x48"."""
    if PCI_BASE_ADDRESS_0 <= register < PCI_BASE_ADDRESS_0 + 4 * PCI_NUM_BARS:
        bar, byte = divmod(register - PCI_BASE_ADDRESS_0, 4)
        return f"BAR{bar}" + (f"+{byte}" if byte else "")
    return CONFIG_HEADER_NAMES.get(register, f"config {register:#04x}")


def _conf1_where(address: int) -> str:
    """A CONFIG_ADDRESS value as "bb:dd.f 0xrr" (PCI 3.0 section 3.2.2.3.2)."""
    bus, dev, fn = (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7
    return f"{bus:02x}:{dev:02x}.{fn} {address & 0xFC:#04x}"


@dataclass
class _Slot:
    device: PciDevice
    mapped: dict[int, tuple[int, BusDeviceRange]] = field(default_factory=dict)  # BAR -> (address, range)
    ioevents: set[tuple[int, int, int, int | None]] = field(default_factory=set)  # addr, len, fd, match
    rejected: dict[int, int] = field(default_factory=dict)  # BAR -> address already warned about


class SharedIntxLine:
    """One GSI shared by several INTx pins: the wired-OR of their levels (PCI 3.0 section 2.2.6)."""

    def __init__(self, line: InterruptLine) -> None:
        self._line = line
        self._lock = threading.Lock()
        self._asserted: set[int] = set()  # slots whose pin is asserted

    def pin(self, slot: int) -> _IntxPin:
        return _IntxPin(self, slot)

    def set_pin(self, slot: int, level: bool) -> None:
        with self._lock:  # a leaf lock: the KVM_IRQ_LINE call is made under it, so levels stay in order
            before = bool(self._asserted)
            if level:
                self._asserted.add(slot)
            else:
                self._asserted.discard(slot)
            if bool(self._asserted) != before:
                self._line.set_level(not before)


@dataclass(frozen=True)
class _IntxPin:
    """The `InterruptLine` a function in `slot` drives."""

    shared: SharedIntxLine
    slot: int

    def set_level(self, level: bool) -> None:
        self.shared.set_pin(self.slot, level)


class PciHostBridge:
    """Bus 0 with the host bridge at 00:00.0 and up to 31 single-function devices.

    `mmio_bus` is the machine's MMIO `Bus`; `ioevents` attaches ioeventfds (KVM_IOEVENTFD);
    `mmio32` allocates in the BAR window below 4 GiB (e.g. 0xC000_0000-0xFEBF_FFFF) and
    `mmio64` in an optional window above RAM (the machine's `ResourceAllocator` owns both).
    `conf1` is the configuration-mechanism-#1 port device, for the machine to put on its PIO bus.
    `intx` provides the GSI lines INTx pins are wired to (without it, no pin is connected).
    """

    def __init__(
        self,
        mmio_bus: Bus,
        ioevents: IoEventRegistry,
        mmio32: AddressAllocator,
        mmio64: AddressAllocator | None = None,
        *,
        intx: InterruptController | None = None,
    ) -> None:
        if mmio32.window.end > 1 << 32 or mmio32.window.size <= 0:
            raise ValueError("the 32-bit MMIO window must lie below 4 GiB")
        if mmio64 is not None and mmio64.window.size <= 0:
            raise ValueError("empty 64-bit MMIO window")
        self.mmio_bus = mmio_bus
        self.ioevents = ioevents
        self.mmio32, self.mmio64 = mmio32, mmio64
        self.windows = tuple(a.window for a in (mmio32, mmio64) if a is not None)
        self._assigned: dict[int, list[tuple[AddressAllocator, AddressRange]]] = {}  # slot -> its BARs' allocations
        self._lock = threading.RLock()
        self._slots: dict[int, _Slot] = {}
        self.warnings = Counter[str]()  # "bar-overlap", "bar-outside-window", "ioeventfd"
        self.conf1 = Conf1(self)
        self._intx = intx
        self._intx_lines: dict[int, SharedIntxLine] = {}  # GSI -> its wired-OR
        self._attach(0, HostBridge())

    # -- devices --------------------------------------------------------------------------

    def add_device(self, device: PciDevice, slot: int | None = None, *, enable_memory: bool = True) -> int:
        """Plug `device` in as function 0 of `slot` (the lowest free of 1..31 by default),
        pre-assign its BARs and, like firmware, enable memory decoding. Returns the slot."""
        with self._lock:
            if slot is None:
                free = self.free_slots()
                if not free:
                    raise UserError(f"{device.name}: PCI bus 0 is full (at most {PCI_SLOTS - 1} devices)")
                slot = free[0]
            elif not 1 <= slot < PCI_SLOTS or slot in self._slots:
                raise UserError(f"{device.name}: PCI slot {slot} is not free")
            config = device.config
            bars = sorted(config.bars.values(), key=lambda b: -b.size)  # largest first: least padding
            mine: list[tuple[AddressAllocator, AddressRange]] = []
            try:
                for bar in bars:
                    mine.append(self._allocate(bar, device.name))
            except UserError:
                self._free(mine)
                raise
            self._assigned[slot] = mine
            for bar, (_, rng) in zip(bars, mine):
                config.set_bar_address(bar.index, rng.base)
            if enable_memory:
                config.set(PCI_COMMAND, 2, config.command | PCI_COMMAND_MEMORY)
            self._wire_intx(slot, device)
            self._attach(slot, device)
        return slot

    def intx_gsi(self, slot: int) -> int | None:
        """The GSI the function in `slot` drives, or None (no pin, or no INTx routing)."""
        s = self._slots.get(slot)
        pin = s.device.interrupt_pin if s is not None else 0
        return layout.pci_intx_gsi(slot, pin - 1) if pin and self._intx is not None else None

    def _wire_intx(self, slot: int, device: PciDevice) -> None:
        pin = device.interrupt_pin
        if self._intx is None or not 1 <= pin <= 4:
            return
        gsi = layout.pci_intx_gsi(slot, pin - 1)  # _PRT and layout count INTA as 0
        shared = self._intx_lines.get(gsi)
        if shared is None:
            shared = self._intx_lines[gsi] = SharedIntxLine(self._intx.irq_line(gsi))
        device.connect_intx(shared.pin(slot))

    def _attach(self, slot: int, device: PciDevice) -> None:
        self._slots[slot] = _Slot(device)
        device.set_mapping_listener(lambda: self.reconcile(slot))
        self.reconcile(slot)

    def remove_device(self, slot: int) -> None:
        with self._lock:
            s = self._slots.pop(slot)
            self._free(self._assigned.pop(slot, []))
            s.device.set_mapping_listener(None)
            self._apply(s, {}, set())
            for shared in self._intx_lines.values():
                shared.set_pin(slot, False)  # an unplugged function no longer drives its GSI

    def device(self, slot: int) -> PciDevice | None:
        s = self._slots.get(slot)
        return None if s is None else s.device

    def free_slots(self) -> list[int]:
        """The empty slots of bus 0 that `add_device` may fill, lowest first (slot 0 is the bridge)."""
        with self._lock:
            return [s for s in range(1, PCI_SLOTS) if s not in self._slots]

    @property
    def devices(self) -> dict[int, PciDevice]:
        return {n: s.device for n, s in self._slots.items()}

    def _allocate(self, bar: BarInfo, what: str) -> tuple[AddressAllocator, AddressRange]:
        """Naturally aligned, in the preferred window: a 64-bit BAR in the 64-bit window when
        there is one (else the 32-bit one), a 32-bit BAR in the 32-bit window."""
        order = [a for a in (self.mmio64, self.mmio32) if a is not None] if bar.mem64 else [self.mmio32]
        for allocator in order[:-1]:
            try:
                return allocator, allocator.allocate(bar.size, bar.size, f"{what} BAR{bar.index}")
            except UserError:
                continue
        return order[-1], order[-1].allocate(bar.size, bar.size, f"{what} BAR{bar.index}")

    @staticmethod
    def _free(allocations: list[tuple[AddressAllocator, AddressRange]]) -> None:
        for allocator, rng in allocations:
            allocator.free(rng)

    # -- configuration access -------------------------------------------------------------------

    def _function(self, address: int) -> PciDevice | None:
        if not address & PCI_CONF1_ENABLE:
            return None
        bus, dev, fn = (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7
        if bus != 0 or fn != 0:
            return None
        s = self._slots.get(dev)
        return None if s is None else s.device

    def read_config_at(self, address: int, byte: int, size: int) -> int:
        """A CONFIG_DATA read: `byte` (0-3) is the port offset from 0xCFC."""
        device = self._function(address)
        if device is None:
            return (1 << (8 * size)) - 1
        return device.config.read((address & 0xFC) + byte, size)

    def write_config_at(self, address: int, byte: int, size: int, value: int) -> None:
        device = self._function(address)
        if device is not None:
            device.config.write((address & 0xFC) + byte, size, value)

    def read_config(self, slot: int, register: int, size: int) -> int:
        """Read config space of 00:slot.0 directly (as mechanism #1 would)."""
        return self.read_config_at(conf1_address(0, slot, 0, register), register & 3, size)

    def write_config(self, slot: int, register: int, size: int, value: int) -> None:
        self.write_config_at(conf1_address(0, slot, 0, register), register & 3, size, value)

    # -- BAR mapping --------------------------------------------------------------------------

    def reconcile(self, slot: int) -> None:
        """Make the MMIO bus and ioeventfds match the device's BARs and command register."""
        with self._lock:
            s = self._slots.get(slot)
            if s is None:
                return
            config = s.device.config
            wanted: dict[int, int] = {}
            if config.memory_enabled:
                for bar in config.bars.values():
                    addr = config.bar_address(bar.index)
                    if self._placeable(s, bar, addr):
                        wanted[bar.index] = addr
            events: set[tuple[int, int, int, int | None]] = set()
            for ev in s.device.ioeventfds():
                target = config.bars.get(ev.bar)
                if ev.bar in wanted and target is not None and 0 <= ev.offset <= target.size - ev.length:
                    events.add((wanted[ev.bar] + ev.offset, ev.length, ev.fd, ev.datamatch))
            self._apply(s, wanted, events, slot)

    def _placeable(self, s: _Slot, bar: BarInfo, addr: int) -> bool:
        if addr == 0:
            return False  # unassigned
        if any(w.covers(addr, bar.size) for w in self.windows):
            return True
        if self._is_sizing_pattern(bar, addr):
            return False  # mid-sizing with decoding left on: not a placement
        self._warn_once(s, bar.index, addr, "bar-outside-window", "outside the MMIO windows")
        return False

    @staticmethod
    def _is_sizing_pattern(bar: BarInfo, addr: int) -> bool:
        low_mask = ~(bar.size - 1) & 0xFFFF_FFF0
        return addr & 0xFFFF_FFF0 == low_mask or (bar.mem64 and addr >> 32 == 0xFFFF_FFFF)

    def _warn_once(self, s: _Slot, index: int, addr: int, kind: str, what: str) -> None:
        if s.rejected.get(index) == addr:
            return
        s.rejected[index] = addr
        self.warnings[kind] += 1
        log.warning("pci %s: BAR%d at %#x %s: left unmapped", s.device.name, index, addr, what)

    def _apply(
        self, s: _Slot, wanted: dict[int, int], events: set[tuple[int, int, int, int | None]], slot: int = -1
    ) -> None:
        for ev in sorted(s.ioevents - events, key=str):
            self._remove_ioevent(ev)
            s.ioevents.discard(ev)
        for index, (addr, rng) in list(s.mapped.items()):
            if wanted.get(index) != addr:
                self.mmio_bus.unregister(rng)
                del s.mapped[index]
        for index, addr in wanted.items():
            if index in s.mapped:
                continue
            bar = s.device.config.bars[index]
            try:
                rng = self.mmio_bus.register(
                    addr, bar.size, s.device.bar_handlers[index], f"pci-00:{slot:02x}.0-{s.device.name}-bar{index}"
                )
            except BusError as exc:
                self._warn_once(s, index, addr, "bar-overlap", f"overlaps another range ({exc})")
                continue
            s.mapped[index] = (addr, rng)
            s.rejected.pop(index, None)
        for ev in sorted(events - s.ioevents, key=str):
            if self._map_addr_ok(s, ev[0]):
                try:
                    self.ioevents.add_ioeventfd(ev[0], ev[1], ev[2], datamatch=ev[3])
                except OSError as exc:
                    self.warnings["ioeventfd"] += 1
                    log.warning("pci %s: ioeventfd at %#x: %s", s.device.name, ev[0], exc)
                    continue
                s.ioevents.add(ev)

    @staticmethod
    def _map_addr_ok(s: _Slot, addr: int) -> bool:
        return any(base <= addr < rng.end for base, rng in s.mapped.values())

    def _remove_ioevent(self, ev: tuple[int, int, int, int | None]) -> None:
        try:
            self.ioevents.remove_ioeventfd(ev[0], ev[1], ev[2], datamatch=ev[3])
        except OSError as exc:
            self.warnings["ioeventfd"] += 1
            log.warning("pci: removing ioeventfd at %#x: %s", ev[0], exc)

    @property
    def mapped_bars(self) -> dict[tuple[int, int], int]:
        """(slot, BAR) -> the address it is mapped at, for diagnostics and tests."""
        with self._lock:
            return {(n, i): addr for n, s in self._slots.items() for i, (addr, _) in s.mapped.items()}
