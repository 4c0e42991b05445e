"""PIO and MMIO buses: map an address range to the device that claims it.

A device implements `BusDevice`: `read(offset, size) -> int` and `write(offset, size, value)`,
with `offset` relative to the start of the range it was registered at and `size` in 1/2/4/8.
Unclaimed reads return all-ones and unclaimed writes are dropped; both are counted.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class BusDeviceRange:
    """A device's claim on a bus: [base, base + size) goes to `device` (not a plain range:
    plain ranges are `ranges.AddressRange`)."""

    base: int
    size: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        return self.base + self.size


class BusError(ValueError):
    """A registration that overlaps an existing range (a VMM bug or a guest BAR clash)."""


class Bus:
    """An address space (port I/O or MMIO) dispatching accesses to registered ranges."""

    def __init__(self, name: str) -> None:
        self.name = name
        # (bases, ranges), sorted by base, replaced whole under the lock: a lookup on a vCPU
        # thread reads one snapshot without locking, however a hot-add changes the map.
        self._map: tuple[tuple[int, ...], tuple[BusDeviceRange, ...]] = ((), ())
        self._lock = threading.Lock()
        self.unclaimed = Counter[str]()  # "read"/"write" -> count
        self.hits = Counter[str]()  # range name -> count

    def register(self, base: int, size: int, device: BusDevice, name: str | None = None) -> BusDeviceRange:
        if size <= 0 or base < 0:
            raise BusError(f"{self.name}: bad range {base:#x}+{size:#x}")
        rng = BusDeviceRange(base, size, device, name or type(device).__name__)
        with self._lock:
            bases, ranges = self._map
            i = bisect.bisect_left(bases, base)
            for other in ranges[max(0, i - 1) : i + 1]:
                if rng.base < other.end and other.base < rng.end:
                    raise BusError(
                        f"{self.name}: {rng.name} {base:#x}+{size:#x} overlaps {other.name} {other.base:#x}+{other.size:#x}"
                    )
            self._map = (bases[:i] + (base,) + bases[i:], ranges[:i] + (rng,) + ranges[i:])
        return rng

    def unregister(self, rng: BusDeviceRange) -> None:
        with self._lock:
            bases, ranges = self._map
            i = ranges.index(rng)
            self._map = (bases[:i] + bases[i + 1 :], ranges[:i] + ranges[i + 1 :])

    def lookup(self, addr: int) -> BusDeviceRange | None:
        bases, ranges = self._map
        i = bisect.bisect_right(bases, addr) - 1
        if i >= 0:
            rng = ranges[i]
            if addr < rng.end:
                return rng
        return None

    @property
    def ranges(self) -> tuple[BusDeviceRange, ...]:
        return self._map[1]

    def read(self, addr: int, size: int) -> tuple[int, BusDeviceRange | None]:
        """Dispatch a read; returns (value, range) — all-ones and None when unclaimed."""
        rng = self.lookup(addr)
        if rng is None or addr + size > rng.end:
            self.unclaimed["read"] += 1
            return (1 << (8 * size)) - 1, None
        self.hits[rng.name] += 1
        return rng.device.read(addr - rng.base, size) & ((1 << (8 * size)) - 1), rng

    def write(self, addr: int, size: int, value: int) -> BusDeviceRange | None:
        """Dispatch a write; returns the range that took it, or None when dropped."""
        rng = self.lookup(addr)
        if rng is None or addr + size > rng.end:
            self.unclaimed["write"] += 1
            return None
        self.hits[rng.name] += 1
        rng.device.write(addr - rng.base, size, value & ((1 << (8 * size)) - 1))
        return rng
