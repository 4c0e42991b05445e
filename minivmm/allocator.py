"""The machine's one resource allocator: KVM memory slots, GSIs, and guest-physical windows.

Everything a device or a region needs from the machine's finite spaces comes from here, so a
hot-added device takes the next free resource the same way a boot-time one does:

* KVM memory slots (`KVM_SET_USER_MEMORY_REGION`, api.rst 4.35), numbered from 0;
* GSIs for MSI routes (`KVM_SET_GSI_ROUTING`, api.rst 4.52), above the IOAPIC's pins;
* address windows, first fit with natural or given alignment: the 32- and 64-bit PCI MMIO
  windows (BARs) and the pmem window (pmem regions, 128 MiB aligned: the x86-64 memory
  hotplug section size, so Linux can map each region as its own section).

Running out of any of them is a `UserError` naming what ran out (a user asks for too many
devices); a double free is a `ValueError` (a VMM bug).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from . import layout
from .errors import UserError
from .ranges import AddressRange
from .units import format_size


class IdAllocator:
    """Small integers from [first, limit): the lowest free one first."""

    def __init__(self, what: str, first: int, limit: int) -> None:
        self.what = what
        self.first, self.limit = first, limit
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def allocate(self) -> int:
        with self._lock:
            for n in range(self.first, self.limit):
                if n not in self._used:
                    self._used.add(n)
                    return n
        raise UserError(f"out of {self.what}: all {self.limit - self.first} are in use")

    def free(self, n: int) -> None:
        with self._lock:
            if n not in self._used:
                raise ValueError(f"{self.what} {n} is not allocated")
            self._used.remove(n)

    @property
    def used(self) -> frozenset[int]:
        return frozenset(self._used)


class AddressAllocator:
    """First-fit allocation of aligned sub-ranges of one window (`window`)."""

    def __init__(self, description: str, window: AddressRange) -> None:
        self.description = description  # e.g. "the 32-bit PCI MMIO window", for errors
        self.window = window
        self._taken: list[AddressRange] = []  # sorted by base
        self._lock = threading.Lock()

    def allocate(self, size: int, align: int, what: str) -> AddressRange:
        """The lowest `align`-aligned free range of `size` bytes; `UserError` naming `what`
        when the window has no room. `align` is a power of two."""
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation of {size:#x} bytes aligned {align:#x}")
        with self._lock:
            addr = layout.align_up(self.window.base, align)
            for taken in self._taken:
                if addr + size <= taken.base:
                    break
                addr = max(addr, layout.align_up(taken.end, align))
            rng = AddressRange(addr, size)
            if not self.window.covers(addr, size):
                raise UserError(f"{what}: no room for {format_size(size)} in {self.description} ({self.window})")
            self._taken.append(rng)
            self._taken.sort(key=lambda r: r.base)
            return rng

    def free(self, rng: AddressRange) -> None:
        with self._lock:
            self._taken.remove(rng)

    @property
    def allocations(self) -> tuple[AddressRange, ...]:
        with self._lock:
            return tuple(self._taken)


# KVM's limits: KVM_MAX_IRQ_ROUTES (include/linux/kvm_host.h) bounds GSIs; memory slots are
# bounded by KVM_CAP_NR_MEMSLOTS (asked at run time: `Kvm.max_memory_slots`).
KVM_MAX_IRQ_ROUTES = 4096


@dataclass
class ResourceAllocator:
    """The machine's resources for a guest of `mem_size` bytes of RAM (see module docstring)."""

    mem_size: int
    max_memory_slots: int = 32
    phys_addr_bits: int = layout.DEFAULT_PHYS_ADDR_BITS
    memory_slots: IdAllocator = field(init=False)
    gsis: IdAllocator = field(init=False)
    mmio32: AddressAllocator = field(init=False)
    mmio64: AddressAllocator = field(init=False)
    pmem: AddressAllocator = field(init=False)

    def __post_init__(self) -> None:
        self.memory_slots = IdAllocator("KVM memory slots", 0, self.max_memory_slots)
        self.gsis = IdAllocator("MSI GSIs", layout.FIRST_MSI_GSI, KVM_MAX_IRQ_ROUTES)
        self.mmio32 = AddressAllocator("the 32-bit PCI MMIO window", layout.PCI_MMIO32)
        self.mmio64 = AddressAllocator("the 64-bit PCI MMIO window", layout.pci_mmio64_window(self.mem_size))
        self.pmem = AddressAllocator(
            f"the pmem window, below the {self.phys_addr_bits}-bit guest physical address limit",
            layout.pmem_window(self.mem_size, self.phys_addr_bits),
        )
