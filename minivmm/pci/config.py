"""A type-0 PCI configuration space: 256 bytes with per-byte write masks.

Every byte has a writable mask (bits the guest may change) and a write-1-to-clear mask
(bits a guest write of 1 clears: the error bits of the status register, PCI 3.0 section
6.2.3). Everything else is read-only to the guest; the owning device changes it with
`set()`. Accesses are 1, 2 or 4 bytes at any offset; they are applied byte by byte, so an
unaligned access is simply split.

Base address registers (PCI 3.0 section 6.2.5.1) are declared with `add_bar()`: the writable
mask of a BAR holds exactly the address bits above its size, so the guest's sizing write of
all-ones reads back ``~(size - 1) | flags``. A 64-bit BAR spans two slots; the guest-written
address takes effect (`bar_address()`, and the `on_change` callback) when its upper dword is
written - Linux writes the lower dword first - or when the command register is written.

Capabilities (PCI 3.0 section 6.7) are appended with `add_capability()`: it sets
PCI_STATUS_CAP_LIST, links `cap_next` and gives each capability its own writable mask and
optional read/write hooks (MSI-X Message Control, the virtio PCI configuration access
capability).

INTx (PCI 3.0 sections 6.2.4, 6.8.1): a function with an interrupt pin sets Interrupt Pin
(1 = INTA#) with `set()`; PCI_STATUS_INTERRUPT is the function's own interrupt state, read
live from `interrupt_status` (so no lock is taken by whoever changes that state), and
`after_write` lets the owner re-evaluate its INTx level after each guest write (Interrupt
Disable in the command register, the MSI-X enable bit).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from .pci_regs import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_32,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BIST,
    PCI_CACHE_LINE_SIZE,
    PCI_CAP_LIST_NEXT,
    PCI_CAPABILITY_LIST,
    PCI_CARDBUS_CIS,
    PCI_CFG_SPACE_SIZE,
    PCI_CLASS_DEVICE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_COMMAND_PARITY,
    PCI_COMMAND_SERR,
    PCI_DEVICE_ID,
    PCI_HEADER_TYPE,
    PCI_HEADER_TYPE_NORMAL,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_LATENCY_TIMER,
    PCI_MAX_LAT,
    PCI_MIN_GNT,
    PCI_NUM_BARS,
    PCI_REVISION_ID,
    PCI_ROM_ADDRESS,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_STATUS_ERROR_BITS,
    PCI_STATUS_INTERRUPT,
    PCI_STD_HEADER_SIZEOF,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
)

# Command bits a guest may set. PCI_COMMAND_IO stays 0: no device here has I/O BARs.
COMMAND_WRITABLE = (
    PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE
)


@dataclass(frozen=True)
class HeaderField:
    """One register of the configuration header: where it is and which bits the guest owns."""

    offset: int
    size: int
    name: str
    wmask: int = 0  # bits the guest may write
    w1cmask: int = 0  # bits a guest write of 1 clears


# The type-0 header (PCI 3.0 figure 6-1). BARs (0x10-0x27) get their masks from add_bar();
# undeclared BAR slots, Cardbus CIS and the expansion ROM BAR read 0 and ignore writes, which
# is how a function without them answers a sizing probe. Reserved bytes 0x35-0x3b are 0.
TYPE0_HEADER: tuple[HeaderField, ...] = (
    HeaderField(PCI_VENDOR_ID, 2, "vendor_id"),
    HeaderField(PCI_DEVICE_ID, 2, "device_id"),
    HeaderField(PCI_COMMAND, 2, "command", wmask=COMMAND_WRITABLE),
    HeaderField(PCI_STATUS, 2, "status", w1cmask=PCI_STATUS_ERROR_BITS),
    HeaderField(PCI_REVISION_ID, 1, "revision_id"),
    HeaderField(PCI_CLASS_PROG, 1, "class_prog"),
    HeaderField(PCI_CLASS_DEVICE, 2, "class_device"),
    HeaderField(PCI_CACHE_LINE_SIZE, 1, "cache_line_size", wmask=0xFF),
    HeaderField(PCI_LATENCY_TIMER, 1, "latency_timer"),  # hardwired 0, as on PCI Express
    HeaderField(PCI_HEADER_TYPE, 1, "header_type"),
    HeaderField(PCI_BIST, 1, "bist"),
    HeaderField(PCI_CARDBUS_CIS, 4, "cardbus_cis"),
    HeaderField(PCI_SUBSYSTEM_VENDOR_ID, 2, "subsystem_vendor_id"),
    HeaderField(PCI_SUBSYSTEM_ID, 2, "subsystem_id"),
    HeaderField(PCI_ROM_ADDRESS, 4, "rom_address"),
    HeaderField(PCI_CAPABILITY_LIST, 1, "capabilities_pointer"),
    HeaderField(PCI_INTERRUPT_LINE, 1, "interrupt_line", wmask=0xFF),
    HeaderField(PCI_INTERRUPT_PIN, 1, "interrupt_pin"),  # 0: no INTx pin
    HeaderField(PCI_MIN_GNT, 1, "min_gnt"),
    HeaderField(PCI_MAX_LAT, 1, "max_lat"),
)

CAP_START = PCI_STD_HEADER_SIZEOF  # first byte available to capabilities

AccessHook = Callable[[int, int], None]  # (offset within the capability, access size)


@dataclass(frozen=True)
class BarInfo:
    """A memory BAR as declared by the device (PCI 3.0 section 6.2.5.1)."""

    index: int
    size: int
    mem64: bool
    prefetchable: bool

    @property
    def flags(self) -> int:
        mem_type = PCI_BASE_ADDRESS_MEM_TYPE_64 if self.mem64 else PCI_BASE_ADDRESS_MEM_TYPE_32
        return mem_type | (PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0)


@dataclass(frozen=True)
class Capability:
    cap_id: int
    offset: int
    length: int
    on_read: AccessHook | None = None  # refresh the bytes before a guest read
    on_write: AccessHook | None = None  # react after a guest write


class PciConfigSpace:
    """256 bytes of type-0 configuration space for one PCI function."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision_id: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        header_type: int = PCI_HEADER_TYPE_NORMAL,
    ) -> None:
        self._data = bytearray(PCI_CFG_SPACE_SIZE)
        self._wmask = bytearray(PCI_CFG_SPACE_SIZE)
        self._w1cmask = bytearray(PCI_CFG_SPACE_SIZE)
        self._lock = threading.RLock()
        for field in TYPE0_HEADER:
            self._set_mask(self._wmask, field.offset, field.size, field.wmask)
            self._set_mask(self._w1cmask, field.offset, field.size, field.w1cmask)
        self.set(PCI_VENDOR_ID, 2, vendor_id)
        self.set(PCI_DEVICE_ID, 2, device_id)
        self.set(PCI_REVISION_ID, 1, revision_id)
        self.set(PCI_CLASS_PROG, 1, class_code & 0xFF)
        self.set(PCI_CLASS_DEVICE, 2, class_code >> 8)
        self.set(PCI_HEADER_TYPE, 1, header_type)
        self.set(PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self.set(PCI_SUBSYSTEM_ID, 2, subsystem_id)
        self.bars: dict[int, BarInfo] = {}
        self._bar_addr: dict[int, int] = {}  # the address in effect, per declared BAR
        self._bar_pending: set[int] = set()  # 64-bit BARs whose lower dword awaits the upper
        self.capabilities: list[Capability] = []
        self._cap_end = CAP_START
        # Called (outside the lock) after the guest moved a BAR or toggled a command bit.
        self.on_change: Callable[[], None] | None = None
        # Called (outside the lock) after every guest write, with (offset, size).
        self.after_write: AccessHook | None = None
        # The function's INTx state, shown as PCI_STATUS_INTERRUPT (None: never pending).
        self.interrupt_status: Callable[[], bool] | None = None

    # -- owner-side access (no masks) ---------------------------------------------------

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self._data[offset : offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        """Set bytes regardless of the guest masks (device-owned state)."""
        with self._lock:
            self._data[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    @staticmethod
    def _set_mask(mask: bytearray, offset: int, size: int, value: int) -> None:
        mask[offset : offset + size] = value.to_bytes(size, "little")

    @property
    def command(self) -> int:
        return self.get(PCI_COMMAND, 2)

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & PCI_COMMAND_MEMORY)

    # -- BARs -----------------------------------------------------------------------------

    def add_bar(self, index: int, size: int, *, mem64: bool = True, prefetchable: bool = False) -> BarInfo:
        """Declare memory BAR `index` (a 64-bit BAR also takes slot index + 1)."""
        if size < 16 or size & (size - 1):
            raise ValueError(f"BAR size {size:#x} is not a power of two >= 16")
        slots = (index, index + 1) if mem64 else (index,)
        if slots[-1] >= PCI_NUM_BARS or index < 0:
            raise ValueError(f"BAR {index} out of range")
        if mem64 and size > 1 << 63 or not mem64 and size > 1 << 31:
            raise ValueError(f"BAR size {size:#x} too large")
        taken = {i for b in self.bars.values() for i in ((b.index, b.index + 1) if b.mem64 else (b.index,))}
        if taken.intersection(slots):
            raise ValueError(f"BAR slot {index} already in use")
        bar = BarInfo(index, size, mem64, prefetchable)
        addr_mask = ~(size - 1) & ((1 << 64) - 1) & ~0xF
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        with self._lock:
            self._set_mask(self._wmask, reg, 4, addr_mask & 0xFFFFFFFF)
            self.set(reg, 4, bar.flags)
            if mem64:
                self._set_mask(self._wmask, reg + 4, 4, addr_mask >> 32)
                self.set(reg + 4, 4, 0)
            self.bars[index] = bar
            self._bar_addr[index] = 0
        return bar

    def _bar_register_address(self, bar: BarInfo) -> int:
        reg = PCI_BASE_ADDRESS_0 + 4 * bar.index
        addr = self.get(reg, 4) & ~0xF
        if bar.mem64:
            addr |= self.get(reg + 4, 4) << 32
        return addr

    def bar_address(self, index: int) -> int:
        """The address BAR `index` decodes at (when memory decoding is enabled)."""
        return self._bar_addr[index]

    def set_bar_address(self, index: int, addr: int) -> None:
        """Program BAR `index` as firmware would (pre-assignment); the address must be aligned."""
        bar = self.bars[index]
        if addr & (bar.size - 1) or (not bar.mem64 and addr >> 32):
            raise ValueError(f"BAR {index}: bad address {addr:#x} for size {bar.size:#x}")
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        with self._lock:
            self.set(reg, 4, (addr & 0xFFFFFFF0) | bar.flags)
            if bar.mem64:
                self.set(reg + 4, 4, addr >> 32)
            self._bar_addr[index] = addr
            self._bar_pending.discard(index)

    def _bar_at(self, offset: int) -> tuple[BarInfo, bool] | None:
        """The declared BAR whose register holds byte `offset`, and whether it is the upper dword."""
        slot = (offset - PCI_BASE_ADDRESS_0) // 4
        if not 0 <= slot < PCI_NUM_BARS:
            return None
        if slot in self.bars:
            return self.bars[slot], False
        below = self.bars.get(slot - 1)
        if below is not None and below.mem64:
            return below, True
        return None

    # -- capabilities ---------------------------------------------------------------------

    def add_capability(
        self,
        cap_id: int,
        body: bytes,
        wmask: bytes | None = None,
        *,
        on_read: AccessHook | None = None,
        on_write: AccessHook | None = None,
    ) -> int:
        """Append a capability; `body` is the whole structure, its first two bytes (ID and
        next pointer) are filled in here. Returns the capability's offset in config space."""
        length = len(body)
        if length < 2 or (wmask is not None and len(wmask) != length):
            raise ValueError("bad capability layout")
        offset = self._cap_end
        if offset + length > PCI_CFG_SPACE_SIZE:
            raise ValueError("configuration space full")
        with self._lock:
            self._data[offset : offset + length] = body
            self._data[offset] = cap_id
            self._data[offset + PCI_CAP_LIST_NEXT] = 0
            if wmask is not None:
                self._wmask[offset + 2 : offset + length] = wmask[2:]
            if self.capabilities:
                self._data[self.capabilities[-1].offset + PCI_CAP_LIST_NEXT] = offset
            else:
                self._data[PCI_CAPABILITY_LIST] = offset
                self.set(PCI_STATUS, 2, self.get(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST)
            cap = Capability(cap_id, offset, length, on_read, on_write)
            self.capabilities.append(cap)
            self._cap_end = (offset + length + 3) & ~3
        return offset

    def _caps_touched(self, offset: int, size: int) -> list[Capability]:
        return [c for c in self.capabilities if offset < c.offset + c.length and c.offset < offset + size]

    # -- guest access -----------------------------------------------------------------------

    @staticmethod
    def _valid(offset: int, size: int) -> bool:
        return size in (1, 2, 4) and 0 <= offset and offset + size <= PCI_CFG_SPACE_SIZE

    def read(self, offset: int, size: int) -> int:
        if not self._valid(offset, size):
            return (1 << (8 * size)) - 1 if size > 0 else 0
        with self._lock:
            for cap in self._caps_touched(offset, size):
                if cap.on_read is not None:
                    start = max(offset, cap.offset)
                    cap.on_read(start - cap.offset, min(offset + size, cap.offset + cap.length) - start)
            value = self.get(offset, size)
        if offset <= PCI_STATUS < offset + size and self.interrupt_status is not None and self.interrupt_status():
            value |= PCI_STATUS_INTERRUPT << (8 * (PCI_STATUS - offset))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if not self._valid(offset, size):
            return
        changed = False
        with self._lock:
            old_command = self.command
            for i in range(size):
                b = (value >> (8 * i)) & 0xFF
                at = offset + i
                wm, w1c = self._wmask[at], self._w1cmask[at]
                self._data[at] = ((self._data[at] & ~wm) | (b & wm)) & ~(b & w1c) & 0xFF
            # BARs: a 32-bit BAR or the upper dword of a 64-bit one commits the address; the
            # lower dword of a 64-bit BAR waits for the upper one.
            for at in range(offset, offset + size):
                hit = self._bar_at(at)
                if hit is None:
                    continue
                bar, upper = hit
                if bar.mem64 and not upper:
                    self._bar_pending.add(bar.index)
                else:
                    self._bar_pending.discard(bar.index)
                    changed |= self._commit_bar(bar)
            if offset < PCI_COMMAND + 2 and PCI_COMMAND < offset + size:
                for index in list(self._bar_pending):
                    changed |= self._commit_bar(self.bars[index])
                self._bar_pending.clear()
                changed |= (old_command ^ self.command) & PCI_COMMAND_MEMORY != 0
            for cap in self._caps_touched(offset, size):
                if cap.on_write is not None:
                    start = max(offset, cap.offset)
                    cap.on_write(start - cap.offset, min(offset + size, cap.offset + cap.length) - start)
        if changed and self.on_change is not None:
            self.on_change()
        if self.after_write is not None:
            self.after_write(offset, size)

    def _commit_bar(self, bar: BarInfo) -> bool:
        addr = self._bar_register_address(bar)
        if addr == self._bar_addr[bar.index]:
            return False
        self._bar_addr[bar.index] = addr
        return True
