"""The split virtqueue, device side (virtio 1.2 section 2.7).

A split virtqueue is three guest-memory areas written by the driver and the device:

* the descriptor table (2.7.5): ``size`` entries of ``struct virtq_desc``;
* the available ring (2.7.6): driver -> device, ``flags``, ``idx``, ``ring[size]``, ``used_event``;
* the used ring (2.7.8): device -> driver, ``flags``, ``idx``, ``ring[size]``, ``avail_event``.

Everything in those areas is guest-controlled. `Virtqueue.pop` validates every index, flag,
address and length before it touches the memory they name, and reports every malformed
request as `VirtqueueError` (the device then sets DEVICE_NEEDS_RESET, 2.1.2), never as another
exception type and never by accessing memory outside guest RAM.

Memory ordering (2.7.13 / 2.7.8). The guest vCPU runs on another host CPU and shares the
rings with us through plain memory. x86-64 is TSO: loads are not reordered with older loads
and stores are not reordered with older stores. CPython performs each memoryview access as a
``memcpy`` inside an opaque C call, so the C compiler cannot move it across the next Python
operation; 2-byte ring indices are read and written through a ``memoryview.cast("H")`` item,
a single aligned 16-bit access, so they are never torn. Hence:

* reading ``avail.idx`` and *then* ``avail.ring[]`` and the descriptors is acquire-ordered;
* writing the used element and *then* ``used.idx`` is release-ordered (2.7.13.3.1).

The one reordering x86 does allow, a later load passing an earlier store, only matters for
VIRTIO_F_EVENT_IDX, which this queue does not implement: a device using `Virtqueue` must not
offer VIRTIO_F_EVENT_IDX. VIRTQ_AVAIL_F_NO_INTERRUPT is only a hint (2.7.7), so reading it
without a full fence can at worst send one extra interrupt.

Thread safety: a queue has no lock; it is processed by exactly one thread at a time.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ...errors import GuestMemoryError
from ...memory import GuestMemory

# 2.7.5 Descriptor flags.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# 2.7.6 / 2.7.8 ring flags.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
# 6 Reserved feature bits (offered by the device, negotiated by the transport).
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29

VIRTQ_MAX_SIZE = 32768  # 2.7: Queue Size is a power of 2, at most 32768
VIRTQ_DESC_ALIGN = 16  # 2.7 table: alignment of each area
VIRTQ_AVAIL_ALIGN = 2
VIRTQ_USED_ALIGN = 4
MAX_CHAIN_BYTES = 1 << 32  # 2.7.5.2: a chain is at most 2^32 bytes in total

# struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; };
virtq_desc = struct.Struct("<QIHH")
# struct virtq_used_elem { le32 id; le32 len; };
virtq_used_elem = struct.Struct("<II")
# Offsets inside struct virtq_avail { le16 flags; le16 idx; le16 ring[]; le16 used_event; }
# and struct virtq_used { le16 flags; le16 idx; struct virtq_used_elem ring[]; le16 avail_event; }.
AVAIL_FLAGS, AVAIL_IDX, AVAIL_RING = 0, 2, 4
USED_FLAGS, USED_IDX, USED_RING = 0, 2, 4


class VirtqueueError(Exception):
    """The driver broke the virtqueue rules: a bad queue layout or a malformed request."""


def desc_table_size(size: int) -> int:
    """Bytes of the descriptor table of a queue of `size` entries (2.7)."""
    return 16 * size


def avail_ring_size(size: int) -> int:
    """Bytes of the available ring, including ``used_event`` (2.7)."""
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    """Bytes of the used ring, including ``avail_event`` (2.7)."""
    return 6 + 8 * size


def guest_segments(mem: GuestMemory, gpa: int, length: int) -> list[tuple[int, int]]:
    """Split [gpa, gpa+length) into pieces each inside one region, or raise VirtqueueError.

    A buffer may span adjacent regions; only the region list is consulted, never guest bytes.
    """
    if gpa < 0 or length < 0:
        raise VirtqueueError(f"bad buffer {gpa:#x}+{length:#x}")
    pieces: list[tuple[int, int]] = []
    while length > 0:
        for r in mem.regions:
            if r.gpa <= gpa < r.end:
                n = min(length, r.end - gpa)
                pieces.append((gpa, n))
                gpa += n
                length -= n
                break
        else:
            raise VirtqueueError(f"buffer at {gpa:#x}+{length:#x} is outside guest memory")
    return pieces


def _u16(mem: GuestMemory, gpa: int) -> int:
    """One untorn little-endian 16-bit load (x86: little-endian host, single 16-bit access)."""
    return mem.view(gpa, 2).cast("H")[0]


def _set_u16(mem: GuestMemory, gpa: int, value: int) -> None:
    """One untorn 16-bit store, used for ``used.idx`` (the release point)."""
    if mem.find(gpa, 2).readonly:
        raise GuestMemoryError(f"write to read-only memory at {gpa:#x}")
    mem.view(gpa, 2).cast("H")[0] = value & 0xFFFF


@dataclass
class DescriptorChain:
    """One request: the head descriptor index and its buffers as (gpa, len) lists.

    Readable buffers (device-readable, driver-written) all precede the writable ones (2.7.4.2).
    Zero-length descriptors are accepted and left out of the lists. Every buffer has been
    checked to lie in guest memory when the chain was popped.
    """

    mem: GuestMemory = field(repr=False)
    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)

    def read(self, limit: int) -> bytes:
        """The first min(limit, readable_len) readable bytes, in chain order."""
        out = bytearray()
        try:
            for gpa, n in self.readable:
                if len(out) >= limit:
                    break
                for sgpa, sn in guest_segments(self.mem, gpa, min(n, limit - len(out))):
                    out += self.mem.view(sgpa, sn)
        except GuestMemoryError as exc:
            raise VirtqueueError(str(exc)) from None
        return bytes(out)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Write `data` into the writable buffers starting `offset` bytes in; returns len(data).

        Raises VirtqueueError if the writable buffers are too short (nothing is written then).
        """
        if offset < 0 or offset + len(data) > self.writable_len:
            raise VirtqueueError(f"{len(data)} bytes at {offset} do not fit {self.writable_len} writable bytes")
        data = memoryview(bytes(data))
        pos = 0
        try:
            for gpa, n in self.writable:
                if pos >= len(data):
                    break
                if offset >= n:
                    offset -= n
                    continue
                take = min(n - offset, len(data) - pos)
                for sgpa, sn in guest_segments(self.mem, gpa + offset, take):
                    self.mem.write(sgpa, data[pos : pos + sn])
                    pos += sn
                offset = 0
        except GuestMemoryError as exc:
            raise VirtqueueError(str(exc)) from None
        return len(data)


class Virtqueue:
    """Device side of one split virtqueue (2.7), set up by the transport at DRIVER_OK.

    `indirect_desc` must be True only if VIRTIO_F_INDIRECT_DESC was negotiated; otherwise a
    descriptor with VIRTQ_DESC_F_INDIRECT is a malformed request (2.7.5.3.1).
    VIRTIO_F_EVENT_IDX is not supported.
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_table: int,
        avail_ring: int,
        used_ring: int,
        *,
        indirect_desc: bool = False,
    ) -> None:
        if not (1 <= size <= VIRTQ_MAX_SIZE) or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of 2 in 1..{VIRTQ_MAX_SIZE}")
        for name, addr, align, length in (
            ("descriptor table", desc_table, VIRTQ_DESC_ALIGN, desc_table_size(size)),
            ("available ring", avail_ring, VIRTQ_AVAIL_ALIGN, avail_ring_size(size)),
            ("used ring", used_ring, VIRTQ_USED_ALIGN, used_ring_size(size)),
        ):
            if addr < 0 or addr % align:
                raise VirtqueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            try:
                region = mem.find(addr, length)
            except GuestMemoryError:
                raise VirtqueueError(f"{name} at {addr:#x}+{length:#x} is outside guest memory") from None
            if name == "used ring" and region.readonly:
                raise VirtqueueError(f"used ring at {addr:#x} is in read-only memory")
        self.mem = mem
        self.size = size
        self.desc_table = desc_table
        self.avail_ring = avail_ring
        self.used_ring = used_ring
        self.indirect_desc = indirect_desc
        self.last_avail_idx = 0  # next avail.ring slot to consume (free-running u16)
        self.used_idx = 0  # our copy of used.idx (free-running u16)
        self._signalled_used_idx = 0  # used.idx when needs_notification() last ran

    # -- available side -------------------------------------------------------------------

    def avail_idx(self) -> int:
        """The driver's avail.idx (one 16-bit load; subsequent reads are ordered after it)."""
        try:
            return _u16(self.mem, self.avail_ring + AVAIL_IDX)
        except GuestMemoryError as exc:  # only if the ring's region was removed
            raise VirtqueueError(str(exc)) from None

    def pending(self) -> int:
        """How many chains are available and not yet popped; VirtqueueError if impossible."""
        n = (self.avail_idx() - self.last_avail_idx) & 0xFFFF
        if n > self.size:
            raise VirtqueueError(f"avail.idx moved {n} entries ahead of a queue of {self.size}")
        return n

    def pop(self) -> DescriptorChain | None:
        """The next available descriptor chain, or None if the driver made none available.

        Raises VirtqueueError for a bad avail.idx, a head out of range or a malformed chain;
        the queue is then broken until reset (the device should call needs_reset).
        """
        if self.pending() == 0:
            return None
        slot = self.avail_ring + AVAIL_RING + 2 * (self.last_avail_idx % self.size)
        try:
            head = _u16(self.mem, slot)
            self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
            if head >= self.size:
                raise VirtqueueError(f"avail ring names descriptor {head} of a queue of {self.size}")
            return self._walk(head)
        except GuestMemoryError as exc:  # checked ranges make this unreachable unless memory was unplugged
            raise VirtqueueError(str(exc)) from None

    def _read_desc(self, table: int, index: int) -> tuple[int, int, int, int]:
        gpa = table + virtq_desc.size * index
        pieces = guest_segments(self.mem, gpa, virtq_desc.size)
        if len(pieces) == 1:
            return self.mem.read_struct(gpa, virtq_desc)
        # an indirect table may straddle two adjacent regions
        return virtq_desc.unpack(b"".join(bytes(self.mem.view(g, n)) for g, n in pieces))

    def _walk(self, head: int) -> DescriptorChain:
        """Follow `next` links from `head` (2.7.5), through at most one indirect table (2.7.5.3)."""
        chain = DescriptorChain(self.mem, head)
        table, table_len, index = self.desc_table, self.size, head
        in_indirect = False
        seen = 0  # descriptors visited in the current table: more than its length means a loop
        total = 0
        seen_writable = False  # including zero-length writable descriptors
        while True:
            seen += 1
            if seen > table_len:
                raise VirtqueueError(f"descriptor chain from {head} loops or exceeds {table_len} entries")
            addr, length, flags, nxt = self._read_desc(table, index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect_desc:
                    raise VirtqueueError("VIRTQ_DESC_F_INDIRECT used but VIRTIO_F_INDIRECT_DESC not negotiated")
                if in_indirect:
                    raise VirtqueueError("indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError("descriptor has both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT")
                count, rem = divmod(length, virtq_desc.size)
                if count == 0 or rem or count > self.size:
                    raise VirtqueueError(f"indirect table length {length} is not 16*n with 1 <= n <= {self.size}")
                guest_segments(self.mem, addr, length)  # the whole table lies in guest memory
                # 2.7.5.3.2: the WRITE flag of the descriptor naming the table is ignored.
                table, table_len, index, seen, in_indirect = addr, count, 0, 0, True
                continue
            writable = bool(flags & VIRTQ_DESC_F_WRITE)
            if not writable and seen_writable:  # 2.7.4.2: writable elements come last
                raise VirtqueueError(f"readable descriptor after a writable one in chain {head}")
            seen_writable |= writable
            total += length
            if total > MAX_CHAIN_BYTES:
                raise VirtqueueError(f"descriptor chain from {head} is longer than 2^32 bytes")
            if length:
                guest_segments(self.mem, addr, length)
                (chain.writable if writable else chain.readable).append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= table_len:
                raise VirtqueueError(f"descriptor next={nxt} is outside a table of {table_len}")
            index = nxt

    # -- used side ------------------------------------------------------------------------

    def add_used(self, head: int, length: int) -> None:
        """Return chain `head` to the driver with `length` bytes written (2.7.8, 2.7.13.3).

        The used element is written first, then used.idx is incremented with one 16-bit
        store; on x86 stores are seen in program order, so the driver never sees the new
        idx before the element (see the module docstring).
        """
        if not 0 <= head < self.size:
            raise VirtqueueError(f"add_used: head {head} outside a queue of {self.size}")
        if not 0 <= length <= 0xFFFFFFFF:
            raise VirtqueueError(f"add_used: length {length} does not fit le32")
        elem = self.used_ring + USED_RING + virtq_used_elem.size * (self.used_idx % self.size)
        try:
            self.mem.write_struct(elem, virtq_used_elem, head, length)
            self.used_idx = (self.used_idx + 1) & 0xFFFF
            _set_u16(self.mem, self.used_ring + USED_IDX, self.used_idx)
        except GuestMemoryError as exc:
            raise VirtqueueError(str(exc)) from None

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the used buffers added since the last call.

        Honours VIRTQ_AVAIL_F_NO_INTERRUPT (2.7.7); False if nothing was added since.
        """
        if self.used_idx == self._signalled_used_idx:
            return False
        self._signalled_used_idx = self.used_idx
        try:
            return not _u16(self.mem, self.avail_ring + AVAIL_FLAGS) & VIRTQ_AVAIL_F_NO_INTERRUPT
        except GuestMemoryError as exc:
            raise VirtqueueError(str(exc)) from None
