"""MSI-X: the capability, the vector table and the pending bit array (PCIe base spec 7.7.2).

Capability (12 bytes): Message Control (table size - 1 in bits 10:0, Function Mask bit 14,
MSI-X Enable bit 15 - the only guest-writable bits), Table Offset/BIR and PBA Offset/BIR.
Table: 16 bytes per vector - Message Address (low dword, bits 1:0 read 0), Message Upper
Address, Message Data, Vector Control (bit 0 Mask, set at reset). PBA: one bit per vector,
in qwords, read-only.

Each vector is an `MsiRoute`. A vector is *masked* when its Mask bit is set, the Function
Mask is set or MSI-X is disabled; its route is masked exactly then. A signal on a masked
vector stays pending in the route's eventfd (`MsiRoute.pending()` is the PBA bit); when the
vector becomes unmasked, the bridge first programs the route with the entry's message, then
unmasks it - re-attaching the irqfd delivers a pending signal once, which clears the pending
bit (section 6.1.4.5: "if a masked vector has its Pending bit set and the vector becomes
unmasked, the function must send the message and clear the Pending bit"). The message is
programmed on unmask so a half-written address/data pair never reaches KVM; a change while
unmasked (undefined by the spec) takes effect immediately.

Devices signal with `notify(i)`, or write `eventfd_of(i)` directly from another thread
(KVM injects the interrupt without Python).
"""

from __future__ import annotations

import struct
import threading

from ..interrupts import InterruptController, MsiRoute
from .config import PciConfigSpace
from .pci_regs import (
    PCI_CAP_ID_MSIX,
    PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_MSIX_FLAGS_QSIZE,
)

MSIX_MAX_VECTORS = PCI_MSIX_FLAGS_QSIZE + 1

# struct msix_capability: cap_id, cap_next, message_control, table_offset_bir, pba_offset_bir
MSIX_CAP = struct.Struct("<BBHII")
MSIX_CAP_WMASK = MSIX_CAP.pack(0, 0, PCI_MSIX_FLAGS_MASKALL | PCI_MSIX_FLAGS_ENABLE, 0, 0)

# struct msix_table_entry: message_address, message_upper_address, message_data, vector_control
MSIX_ENTRY = struct.Struct("<IIII")
MSIX_ENTRY_WMASK = MSIX_ENTRY.pack(0xFFFF_FFFC, 0xFFFF_FFFF, 0xFFFF_FFFF, PCI_MSIX_ENTRY_CTRL_MASKBIT)
MSIX_ENTRY_RESET = MSIX_ENTRY.pack(0, 0, 0, PCI_MSIX_ENTRY_CTRL_MASKBIT)


def pba_size(nvectors: int) -> int:
    """Bytes of PBA for `nvectors` (whole qwords)."""
    return (nvectors + 63) // 64 * 8


MSIX_ENTRY_FIELDS = ("message_address", "message_upper_address", "message_data", "vector_control")


class _TableRegion:
    def __init__(self, msix: MsixTable) -> None:
        self._msix = msix

    def read(self, offset: int, size: int) -> int:
        return self._msix.read_table(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._msix.write_table(offset, size, value)

    def describe(self, offset: int, size: int, value: int, is_write: bool) -> str | None:
        """For `--trace`: "vector 1 message_data = 0x22" (PCI 3.0 section 6.8.2.6-9)."""
        name = MSIX_ENTRY_FIELDS[offset % 16 // 4]
        return f"vector {offset // 16} {name} {'=' if is_write else '->'} {value:#x}"


class _PbaRegion:
    def __init__(self, msix: MsixTable) -> None:
        self._msix = msix

    def read(self, offset: int, size: int) -> int:
        return self._msix.read_pba(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        pass  # the PBA is read-only


class MsixTable:
    """The MSI-X state of one function: `add_to(config)` adds the capability; map `table`
    at BAR `table_bar` + `table_offset` and `pba` at BAR `pba_bar` + `pba_offset`."""

    def __init__(
        self,
        nvectors: int,
        interrupts: InterruptController,
        *,
        table_bar: int,
        table_offset: int,
        pba_bar: int,
        pba_offset: int,
    ) -> None:
        if not 1 <= nvectors <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X table size {nvectors} out of range")
        if table_offset & 7 or pba_offset & 7:
            raise ValueError("MSI-X table and PBA offsets must be qword aligned")
        self.nvectors = nvectors
        self.table_bar, self.table_offset = table_bar, table_offset
        self.pba_bar, self.pba_offset = pba_bar, pba_offset
        self.table_size = nvectors * PCI_MSIX_ENTRY_SIZE
        self.pba_size = pba_size(nvectors)
        self._lock = threading.RLock()
        self._entries = bytearray(MSIX_ENTRY_RESET * nvectors)
        self._routes: list[MsiRoute] = [interrupts.msi_route() for _ in range(nvectors)]
        self._route_masked = [True] * nvectors
        self._route_message: list[tuple[int, int] | None] = [None] * nvectors
        for route in self._routes:
            route.set_masked(True)
        self._config: PciConfigSpace | None = None
        self.cap_offset = 0
        self.table = _TableRegion(self)
        self.pba = _PbaRegion(self)

    # -- capability ----------------------------------------------------------------------

    def add_to(self, config: PciConfigSpace) -> int:
        """Add the MSI-X capability to `config`; returns its offset."""
        body = MSIX_CAP.pack(
            PCI_CAP_ID_MSIX,
            0,
            self.nvectors - 1,
            self.table_offset | self.table_bar,
            self.pba_offset | self.pba_bar,
        )
        self._config = config
        self.cap_offset = config.add_capability(PCI_CAP_ID_MSIX, body, MSIX_CAP_WMASK, on_write=self._cap_written)
        return self.cap_offset

    @property
    def message_control(self) -> int:
        return 0 if self._config is None else self._config.get(self.cap_offset + PCI_MSIX_FLAGS, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.message_control & PCI_MSIX_FLAGS_ENABLE)

    def _cap_written(self, offset: int, size: int) -> None:
        if offset < PCI_MSIX_FLAGS + 2 and PCI_MSIX_FLAGS < offset + size:
            self._sync(range(self.nvectors))

    # -- table and PBA -----------------------------------------------------------------------

    def _entry(self, i: int) -> tuple[int, int, int, int]:
        return MSIX_ENTRY.unpack_from(self._entries, i * PCI_MSIX_ENTRY_SIZE)

    def message(self, i: int) -> tuple[int, int]:
        """(address, data) programmed in entry `i`."""
        lo, hi, data, _ = self._entry(i)
        return hi << 32 | lo, data

    def masked(self, i: int) -> bool:
        """Whether vector `i` is masked (entry Mask bit, Function Mask or MSI-X disabled)."""
        ctrl = self._entry(i)[3]
        control = self.message_control
        return bool(
            ctrl & PCI_MSIX_ENTRY_CTRL_MASKBIT
            or control & PCI_MSIX_FLAGS_MASKALL
            or not control & PCI_MSIX_FLAGS_ENABLE
        )

    def read_table(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > self.table_size:
            return 0
        with self._lock:
            return int.from_bytes(self._entries[offset : offset + size], "little")

    def write_table(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > self.table_size:
            return
        with self._lock:
            for k in range(size):
                at = offset + k
                wm = MSIX_ENTRY_WMASK[at % PCI_MSIX_ENTRY_SIZE]
                self._entries[at] = (self._entries[at] & ~wm | (value >> (8 * k)) & wm) & 0xFF
            first, last = offset // PCI_MSIX_ENTRY_SIZE, (offset + size - 1) // PCI_MSIX_ENTRY_SIZE
            self._sync(range(first, last + 1))

    def read_pba(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > self.pba_size:
            return 0
        value = 0
        for bit in range(8 * size):
            i = 8 * offset + bit
            if i < self.nvectors and self._route_masked[i] and self._routes[i].pending():
                value |= 1 << bit
        return value

    def _sync(self, vectors: range) -> None:
        """Bring each route's mask and message in line with the table and Message Control."""
        with self._lock:
            for i in vectors:
                masked, route = self.masked(i), self._routes[i]
                if not masked:
                    msg = self.message(i)
                    if msg != self._route_message[i]:
                        route.set_message(*msg)
                        self._route_message[i] = msg
                if masked != self._route_masked[i]:
                    route.set_masked(masked)
                    self._route_masked[i] = masked

    # -- signalling -----------------------------------------------------------------------------

    def vector(self, i: int) -> MsiRoute:
        return self._routes[i]

    def eventfd_of(self, i: int) -> int:
        """The eventfd whose write signals vector `i` (from any thread, no Python in KVM)."""
        return self._routes[i].eventfd

    def notify(self, i: int) -> None:
        """Signal vector `i`: delivered now, or left pending while the vector is masked."""
        if 0 <= i < self.nvectors:
            self._routes[i].trigger()

    def reset(self) -> None:
        """Function reset: every entry back to masked with a zero message, MSI-X disabled,
        pending signals dropped."""
        with self._lock:
            self._entries[:] = MSIX_ENTRY_RESET * self.nvectors
            if self._config is not None:
                self._config.set(self.cap_offset + PCI_MSIX_FLAGS, 2, self.nvectors - 1)
            self._sync(range(self.nvectors))
            for route in self._routes:
                route.clear_pending()

    def close(self) -> None:
        for route in self._routes:
            route.close()
