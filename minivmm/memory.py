"""Guest physical memory: RAM and pmem regions, with bounds-checked access.

Every access names a guest-physical address (GPA) and a length; it must lie wholly inside
one region or `GuestMemoryError` is raised. Devices get a `GuestMemory` and never see host
pointers, so a guest-controlled address can never reach host memory outside guest RAM.
"""

from __future__ import annotations

import mmap
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable

from .errors import GuestMemoryError


@dataclass
class Region:
    """One contiguous guest-physical range backed by a host mapping (one KVM memory slot)."""

    gpa: int
    size: int
    mapping: mmap.mmap
    name: str = "ram"
    readonly: bool = False
    log_dirty: bool = False  # KVM logs the pages the guest writes (a lose-unflushed pmem region)
    slot: int = -1  # KVM slot number, set by the machine when registered
    file: str | None = None  # the backing file mapped from `file_offset` (None: anonymous RAM)
    file_offset: int = 0
    # Called with a one-line reason when a guest access to the region could not be backed by
    # the host (its data may be lost: the owner must fail later flushes).
    on_fault: Callable[[str], None] | None = field(default=None, repr=False)
    view: memoryview = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.size <= 0 or len(self.mapping) < self.size:
            raise ValueError(f"region {self.name}: bad size {self.size}")
        self.view = memoryview(self.mapping)[: self.size]

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.end


class GuestMemory:
    """The guest-physical map. Regions never overlap; lookups are bounds-checked."""

    def __init__(self) -> None:
        self._regions: list[Region] = []
        self._lock = threading.Lock()  # guards the region list (hot-add), not the bytes

    @classmethod
    def anonymous(cls, size: int, gpa: int = 0, name: str = "ram") -> "GuestMemory":
        """Guest memory with a single anonymous RAM region (used by tests and tiny guests)."""
        mem = cls()
        mem.add_region(Region(gpa, size, mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), name))
        return mem

    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(self._regions)

    def add_region(self, region: Region) -> Region:
        with self._lock:
            for other in self._regions:
                if region.gpa < other.end and other.gpa < region.end:
                    raise ValueError(f"region {region.name} overlaps {other.name}")
            # A new list, swapped in whole: readers (the exit path) iterate without the lock.
            self._regions = sorted([*self._regions, region], key=lambda r: r.gpa)
        return region

    def find(self, gpa: int, length: int = 1) -> Region:
        """The region holding [gpa, gpa+length), or GuestMemoryError."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest access {gpa:#x}+{length}")
        for r in self._regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r
        raise GuestMemoryError(f"guest access {gpa:#x}+{length:#x} outside guest memory")

    def region_at(self, gpa: int) -> Region | None:
        """The region holding byte `gpa`, or None (no exception: for the exit path)."""
        for r in self._regions:
            if r.contains(gpa):
                return r
        return None

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of [gpa, gpa+length); it must not cross a region boundary."""
        r = self.find(gpa, length)
        off = gpa - r.gpa
        return r.view[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        r = self.find(gpa, len(data))
        if r.readonly:
            raise GuestMemoryError(f"write to read-only region {r.name} at {gpa:#x}")
        off = gpa - r.gpa
        r.view[off : off + len(data)] = data

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.view(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def read_struct(self, gpa: int, fmt: struct.Struct) -> tuple:
        return fmt.unpack(self.view(gpa, fmt.size))

    def write_struct(self, gpa: int, fmt: struct.Struct, *values: object) -> None:
        self.write(gpa, fmt.pack(*values))
