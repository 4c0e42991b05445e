"""In-process stand-ins for the machine's KVM-backed interrupt plumbing
(`minivmm.interrupts`' protocols), and the guest side of PCI configuration mechanism #1.

`FakeMsiRoute` models an irqfd route (`minivmm.kvm_interrupts.KvmMsiRoute`): it starts masked; a
signal on an unmasked route is delivered at once (appended to `delivered` as (address, data));
on a masked route it accumulates in a counter (`pending()`), and unmasking delivers it once -
like KVM re-attaching an irqfd whose eventfd already has a count. tests/test_irq_kvm.py checks
that real KVM behaves this way. `FakeIoEventRegistry` keeps the active ioeventfds and refuses
duplicates as KVM does (EEXIST).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from minivmm.layout import PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_DATA_PORT

if TYPE_CHECKING:
    from minivmm.bus import Bus


class FakeMsiRoute:
    """An `MsiRoute` that records its calls and what it delivered."""

    def __init__(self) -> None:
        self.address = 0
        self.data = 0
        self.masked = True  # as KvmMsiRoute: detached until the first unmask
        self.count = 0  # signals accumulated while masked
        self.delivered: list[tuple[int, int]] = []
        self.calls: list[tuple[str, int, int] | tuple[str, bool]] = []
        self.closed = False
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @property
    def eventfd(self) -> int:
        return self._fd

    def set_message(self, address: int, data: int) -> None:
        self.calls.append(("set_message", address, data))
        self.address, self.data = address, data

    def set_masked(self, masked: bool) -> None:
        self.calls.append(("set_masked", masked))
        self.masked = masked
        if not masked:
            self._drain()

    def _drain(self) -> None:
        try:
            self.count += os.eventfd_read(self._fd)
        except BlockingIOError:
            pass
        if not self.masked and self.count:
            self.delivered.append((self.address, self.data))
            self.count = 0

    def pending(self) -> bool:
        self._drain()
        return self.count > 0

    def clear_pending(self) -> None:
        self._drain()
        self.count = 0

    def trigger(self) -> None:
        os.eventfd_write(self._fd, 1)
        self._drain()

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            self.closed = True


@dataclass
class FakeLine:
    """An interrupt wire: its current level and every change (levels as set, in order)."""

    gsi: int
    level: bool = False
    history: list[bool] = field(default_factory=list)

    def set_level(self, level: bool) -> None:
        self.level = level
        self.history.append(level)


class FakeInterruptController:
    """An `InterruptController` handing out `FakeMsiRoute`s (kept in `routes`, in order)."""

    def __init__(self) -> None:
        self.routes: list[FakeMsiRoute] = []
        self.lines: dict[int, FakeLine] = {}

    def irq_line(self, pin: int) -> FakeLine:
        return self.lines.setdefault(pin, FakeLine(pin))

    def msi_route(self) -> FakeMsiRoute:
        route = FakeMsiRoute()
        self.routes.append(route)
        return route


@dataclass
class FakeIoEventRegistry:
    """An `IoEventRegistry` keeping the registered (addr, length, fd, datamatch) in `active`."""

    active: set[tuple[int, int, int, int | None]] = field(default_factory=set)

    def add_ioeventfd(
        self, addr: int, length: int, fd: int, *, pio: bool = False, datamatch: int | None = None
    ) -> None:
        key = (addr, length, fd, datamatch)
        if key in self.active:
            raise OSError(errno.EEXIST, "ioeventfd already registered")
        self.active.add(key)

    def remove_ioeventfd(
        self, addr: int, length: int, fd: int, *, pio: bool = False, datamatch: int | None = None
    ) -> None:
        key = (addr, length, fd, datamatch)
        if key not in self.active:
            raise OSError(errno.ENOENT, "no such ioeventfd")
        self.active.discard(key)


class GuestConf1:
    """The guest side of configuration mechanism #1, shaped like Linux's `pci_conf1_read/write`
    (arch/x86/pci/direct.c) on top of a PIO `Bus`: one CONFIG_ADDRESS write, then a data
    access at PCI_CONFIG_DATA_PORT + (reg & 3)."""

    def __init__(self, pio: Bus) -> None:
        self.pio = pio

    @staticmethod
    def address(bus: int, dev: int, fn: int, reg: int) -> int:
        return 0x8000_0000 | bus << 16 | dev << 11 | fn << 8 | (reg & 0xFC)

    def read(self, dev: int, reg: int, size: int, *, bus: int = 0, fn: int = 0) -> int:
        self.pio.write(PCI_CONFIG_ADDRESS_PORT, 4, self.address(bus, dev, fn, reg))
        return self.pio.read(PCI_CONFIG_DATA_PORT + (reg & 3), size)[0]

    def write(self, dev: int, reg: int, size: int, value: int, *, bus: int = 0, fn: int = 0) -> None:
        self.pio.write(PCI_CONFIG_ADDRESS_PORT, 4, self.address(bus, dev, fn, reg))
        self.pio.write(PCI_CONFIG_DATA_PORT + (reg & 3), size, value)

    def capabilities(self, dev: int) -> list[tuple[int, int]]:
        """(offset, cap_id) of each capability, walked like `pci_find_capability`."""
        found: list[tuple[int, int]] = []
        if not self.read(dev, 0x06, 2) & 0x10:  # PCI_STATUS_CAP_LIST
            return found
        pos = self.read(dev, 0x34, 1)
        ttl = 48
        while ttl and pos >= 0x40:
            pos &= ~3
            ent = self.read(dev, pos, 2)
            if ent & 0xFF == 0xFF:
                break
            found.append((pos, ent & 0xFF))
            pos = ent >> 8
            ttl -= 1
        return found

    def size_bar(self, dev: int, index: int) -> tuple[int, int, int]:
        """Size memory BAR `index` as Linux's `__pci_read_base` does: decoding off, save,
        write ~0, read, restore (both dwords of a 64-bit BAR), decoding back.
        Returns (address, size, flags)."""
        pos = 0x10 + 4 * index
        orig_cmd = self.read(dev, 0x04, 2)
        if orig_cmd & 0x3:  # PCI_COMMAND_DECODE_ENABLE
            self.write(dev, 0x04, 2, orig_cmd & ~0x3)
        lo = self.read(dev, pos, 4)
        self.write(dev, pos, 4, 0xFFFF_FFFF)
        sz = self.read(dev, pos, 4)
        self.write(dev, pos, 4, lo)
        hi = sz_hi = 0
        mem64 = lo & 0x6 == 0x4
        if mem64:
            hi = self.read(dev, pos + 4, 4)
            self.write(dev, pos + 4, 4, 0xFFFF_FFFF)
            sz_hi = self.read(dev, pos + 4, 4)
            self.write(dev, pos + 4, 4, hi)
        if orig_cmd & 0x3:
            self.write(dev, 0x04, 2, orig_cmd)
        if sz in (0, 0xFFFF_FFFF) and not sz_hi:
            return 0, 0, 0
        mask = (sz_hi << 32 | sz) & ~0xF
        if not mem64:
            mask |= 0xFFFF_FFFF_0000_0000
        size = (mask & -mask) if mask else 0
        return (hi << 32 | lo) & ~0xF, size, lo & 0xF
