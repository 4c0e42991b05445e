"""What the host bridge needs from a PCI function, and a router for registers inside a BAR.

A `PciDevice` owns its `PciConfigSpace`, the `BusDevice` handling each of its memory BARs and
the ioeventfds it wants attached inside them. It never maps anything itself: the
`PciHostBridge` it is plugged into maps and unmaps BARs (and their ioeventfds) whenever the
guest moves a BAR or toggles PCI_COMMAND_MEMORY, or when the device calls
`mapping_changed()` because its ioeventfd list changed.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..bus import BusDevice
from ..interrupts import InterruptLine
from .config import BarInfo, PciConfigSpace
from .pci_regs import PCI_INTERRUPT_PIN


@dataclass(frozen=True)
class IoEventFd:
    """An eventfd KVM signals when the guest writes `length` bytes at BAR `bar` + `offset`."""

    bar: int
    offset: int
    length: int
    fd: int
    datamatch: int | None = None


class PciDevice:
    """Base class of a PCI function: configuration space + BAR handlers + ioeventfds."""

    def __init__(self, config: PciConfigSpace, name: str) -> None:
        self.config = config
        self.name = name
        self.bar_handlers: dict[int, BusDevice] = {}
        self._listener: Callable[[], None] | None = None
        config.on_change = self.mapping_changed

    def add_bar(
        self, index: int, size: int, handler: BusDevice, *, mem64: bool = True, prefetchable: bool = False
    ) -> BarInfo:
        bar = self.config.add_bar(index, size, mem64=mem64, prefetchable=prefetchable)
        self.bar_handlers[index] = handler
        return bar

    def ioeventfds(self) -> Sequence[IoEventFd]:
        """The ioeventfds to attach while the BARs they live in are mapped."""
        return ()

    @property
    def interrupt_pin(self) -> int:
        """Interrupt Pin from config space: 0 none, 1-4 INTA#-INTD# (PCI 3.0 section 6.2.4)."""
        return self.config.get(PCI_INTERRUPT_PIN, 1)

    def connect_intx(self, line: InterruptLine) -> None:
        """Called by the host bridge for a function with an interrupt pin: the wire it drives."""

    def set_mapping_listener(self, listener: Callable[[], None] | None) -> None:
        """Set by the host bridge: called whenever BAR placement or ioeventfds may have changed."""
        self._listener = listener

    def mapping_changed(self) -> None:
        if self._listener is not None:
            self._listener()


@dataclass(frozen=True)
class SubRegion:
    offset: int
    size: int
    handler: BusDevice
    name: str


class BarRouter:
    """A `BusDevice` for a whole BAR, dispatching to non-overlapping sub-regions.

    Accesses outside every sub-region, or straddling a sub-region's end, read as zero and
    are dropped (a BAR's reserved space)."""

    def __init__(self, size: int, regions: Sequence[SubRegion] = (), label: str = "") -> None:
        self.size = size
        self.label = label  # what the BAR belongs to, for `describe` ("virtio")
        self._regions: list[SubRegion] = []
        self._offsets: list[int] = []
        for r in regions:
            self.add(r)

    def add(self, region: SubRegion) -> None:
        if region.offset < 0 or region.size <= 0 or region.offset + region.size > self.size:
            raise ValueError(f"sub-region {region.name} outside the BAR")
        for other in self._regions:
            if region.offset < other.offset + other.size and other.offset < region.offset + region.size:
                raise ValueError(f"sub-region {region.name} overlaps {other.name}")
        bisect.insort(self._regions, region, key=lambda r: r.offset)
        self._offsets = [r.offset for r in self._regions]

    @property
    def regions(self) -> tuple[SubRegion, ...]:
        return tuple(self._regions)

    def _find(self, offset: int, size: int) -> SubRegion | None:
        i = bisect.bisect_right(self._offsets, offset) - 1
        if i >= 0:
            r = self._regions[i]
            if offset + size <= r.offset + r.size:
                return r
        return None

    def read(self, offset: int, size: int) -> int:
        r = self._find(offset, size)
        return 0 if r is None else r.handler.read(offset - r.offset, size)

    def describe(self, offset: int, size: int, value: int, is_write: bool) -> str | None:
        """For `--trace`: the sub-region and what its handler says ("virtio common_cfg queue_select = 0")."""
        r = self._find(offset, size)
        if r is None:
            return f"{self.label} reserved +{offset:#x}".strip()
        inner = getattr(r.handler, "describe", None)
        words = inner(offset - r.offset, size, value, is_write) if inner else None
        return " ".join(w for w in (self.label, r.name, words or f"+{offset - r.offset:#x}") if w)

    def write(self, offset: int, size: int, value: int) -> None:
        r = self._find(offset, size)
        if r is not None:
            r.handler.write(offset - r.offset, size, value)
