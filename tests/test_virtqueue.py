"""Split virtqueue (virtio 1.2 section 2.7): well-formed chains round-trip; hostile ones raise
VirtqueueError only, and never make the queue touch memory outside guest RAM."""

from __future__ import annotations

import mmap
import random
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from minivmm.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChain,
    Virtqueue,
    VirtqueueError,
    virtq_desc,
    virtq_used_elem,
)
from minivmm.memory import GuestMemory, Region

# Guest memory: two adjacent regions and one beyond a hole, none starting at 0.
R0, R0_SIZE = 0x10000, 0x4000
R1, R1_SIZE = 0x14000, 0x1000  # adjacent to R0
R2, R2_SIZE = 0x30000, 0x1000  # after a hole
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000
DATA = 0x13000  # 4 KiB of R0 for buffers, then R1


class RecordingMemory(GuestMemory):
    """GuestMemory that checks every byte access the queue makes lies inside one region."""

    def __init__(self) -> None:
        super().__init__()
        self.accesses: list[tuple[int, int]] = []
        self.strict = True  # off only where a test removes memory under the queue on purpose

    def _check(self, gpa: int, length: int) -> None:
        self.accesses.append((gpa, length))
        assert not self.strict or any(r.gpa <= gpa and gpa + length <= r.end for r in self.regions), f"access {gpa:#x}+{length:#x} outside guest memory"

    def view(self, gpa: int, length: int) -> memoryview:
        self._check(gpa, length)
        return super().view(gpa, length)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._check(gpa, len(data))
        super().write(gpa, data)


def make_memory(readonly_r2: bool = False) -> RecordingMemory:
    mem = RecordingMemory()
    for gpa, size, name in ((R0, R0_SIZE, "r0"), (R1, R1_SIZE, "r1"), (R2, R2_SIZE, "r2")):
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mem.add_region(Region(gpa, size, m, name, readonly=readonly_r2 and name == "r2"))
    return mem


def raw_write(mem: GuestMemory, gpa: int, data: bytes) -> None:
    """Test-side write that bypasses the recording (the 'driver' writing its rings)."""
    GuestMemory.write(mem, gpa, data)


class Driver:
    """A minimal driver side of a split virtqueue laid out like Linux's vring."""

    def __init__(self, mem: GuestMemory, size: int, desc: int = DESC, avail: int = AVAIL, used: int = USED) -> None:
        self.mem, self.size, self.desc, self.avail, self.used = mem, size, desc, avail, used
        self.avail_idx = 0
        self.free = list(range(size))

    def set_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        raw_write(self.mem, table + 16 * i, virtq_desc.pack(addr, length, flags, nxt))

    def add_chain(self, bufs: list[tuple[int, int, bool]]) -> int:
        """bufs: (addr, len, writable); returns the head."""
        idxs = [self.free.pop(0) for _ in bufs]
        for k, (addr, length, w) in enumerate(bufs):
            flags = (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0)
            self.set_desc(self.desc, idxs[k], addr, length, flags, idxs[k + 1] if k + 1 < len(bufs) else 0)
        self.publish(idxs[0])
        return idxs[0]

    def publish(self, head: int) -> None:
        raw_write(self.mem, self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        raw_write(self.mem, self.avail + 2, struct.pack("<H", self.avail_idx))

    def used_idx(self) -> int:
        return struct.unpack("<H", GuestMemory.read(self.mem, self.used + 2, 2))[0]

    def used_elem(self, i: int) -> tuple[int, int]:
        return virtq_used_elem.unpack(GuestMemory.read(self.mem, self.used + 4 + 8 * (i % self.size), 8))


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("size", [0, 3, 6, 100, 65536, 32768 * 2, -4])
def test_bad_size(size: int) -> None:
    with pytest.raises(VirtqueueError):
        Virtqueue(make_memory(), size, DESC, AVAIL, USED)


def test_max_size_accepted() -> None:
    mem = GuestMemory.anonymous(1 << 20, gpa=0x200000)
    q = Virtqueue(mem, 32768, 0x200000, 0x200000 + 16 * 32768, 0x200000 + 16 * 32768 + 0x10004)
    assert q.pop() is None


@pytest.mark.parametrize(
    "desc, avail, used",
    [
        (DESC + 8, AVAIL, USED),  # desc not 16-aligned
        (DESC, AVAIL + 1, USED),  # avail not 2-aligned
        (DESC, AVAIL, USED + 2),  # used not 4-aligned
        (0, AVAIL, USED),  # below guest memory
        (R0 + R0_SIZE + R1_SIZE - 16, AVAIL, USED),  # desc runs off the end of R1
        (DESC, R2 + R2_SIZE - 8, USED),  # avail runs off R2
        (DESC, AVAIL, 0x20000),  # used in the hole
        (DESC, AVAIL, R0 + R0_SIZE - 16),  # used straddles R0/R1: view can't cross regions
        (DESC, AVAIL, 1 << 64),
    ],
)
def test_bad_layout(desc: int, avail: int, used: int) -> None:
    with pytest.raises(VirtqueueError):
        Virtqueue(make_memory(), 16, desc, avail, used)


def test_used_ring_in_readonly_memory() -> None:
    with pytest.raises(VirtqueueError):
        Virtqueue(make_memory(readonly_r2=True), 16, DESC, AVAIL, R2)


# ---------------------------------------------------------------- well-formed chains


def test_round_trip_simple() -> None:
    mem = make_memory()
    q, d = Virtqueue(mem, 8, DESC, AVAIL, USED), Driver(mem, 8)
    assert q.pop() is None
    raw_write(mem, DATA, b"hello")
    head = d.add_chain([(DATA, 5, False), (DATA + 0x100, 8, True)])
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert chain.readable == [(DATA, 5)] and chain.writable == [(DATA + 0x100, 8)]
    assert chain.read(100) == b"hello" and chain.read(2) == b"he"
    chain.write(b"world", offset=1)
    assert GuestMemory.read(mem, DATA + 0x100, 8) == b"\0world\0\0"
    with pytest.raises(VirtqueueError):
        chain.write(b"123456789")
    assert q.pop() is None
    q.add_used(head, 6)
    assert d.used_idx() == 1 and d.used_elem(0) == (head, 6)
    assert q.needs_notification()
    assert not q.needs_notification()  # nothing new since


def test_no_interrupt_flag() -> None:
    mem = make_memory()
    q, d = Virtqueue(mem, 4, DESC, AVAIL, USED), Driver(mem, 4)
    raw_write(mem, AVAIL, struct.pack("<H", VIRTQ_AVAIL_F_NO_INTERRUPT))
    d.add_chain([(DATA, 4, True)])
    q.add_used(q.pop().head, 4)
    assert not q.needs_notification()


def test_avail_idx_wraps() -> None:
    mem = make_memory()
    q, d = Virtqueue(mem, 4, DESC, AVAIL, USED), Driver(mem, 4)
    q.last_avail_idx = q.used_idx = d.avail_idx = 0xFFFE
    for _ in range(4):
        d.free = [0, 1, 2, 3]
        head = d.add_chain([(DATA, 4, False)])
        c = q.pop()
        assert c is not None and c.head == head
        q.add_used(c.head, 0)
    assert q.last_avail_idx == 2 and d.used_idx() == 2


def test_buffer_spanning_adjacent_regions() -> None:
    mem = make_memory()
    q, d = Virtqueue(mem, 4, DESC, AVAIL, USED), Driver(mem, 4)
    start = R1 - 3
    raw_write(mem, start, b"abc")
    raw_write(mem, R1, b"def")
    d.add_chain([(start, 6, False), (R1 - 2, 4, True)])
    c = q.pop()
    assert c.read(6) == b"abcdef"
    c.write(b"WXYZ")
    assert GuestMemory.read(mem, start, 3) == b"aWX" and GuestMemory.read(mem, R1, 3) == b"YZf"


def test_zero_length_descriptors_accepted() -> None:
    mem = make_memory()
    q, d = Virtqueue(mem, 8, DESC, AVAIL, USED), Driver(mem, 8)
    d.add_chain([(0xDEAD_0000_0000, 0, False), (DATA, 4, False), (1 << 63, 0, True), (DATA + 8, 4, True)])
    c = q.pop()
    assert c.readable == [(DATA, 4)] and c.writable == [(DATA + 8, 4)]


def test_chain_of_full_queue_length() -> None:
    mem = make_memory()
    q, d = Virtqueue(mem, 16, DESC, AVAIL, USED), Driver(mem, 16)
    d.add_chain([(DATA + i, 1, i >= 8) for i in range(16)])
    c = q.pop()
    assert len(c.readable) == 8 and len(c.writable) == 8


def test_indirect_round_trip() -> None:
    mem = make_memory()
    q, d = Virtqueue(mem, 4, DESC, AVAIL, USED, indirect_desc=True), Driver(mem, 4)
    table = DATA + 0x800
    d.set_desc(table, 0, DATA, 4, VIRTQ_DESC_F_NEXT, 1)
    d.set_desc(table, 1, DATA + 16, 4, VIRTQ_DESC_F_WRITE, 0)
    d.set_desc(DESC, 0, DATA + 0x40, 2, VIRTQ_DESC_F_NEXT, 1)  # a direct descriptor first (2.7.5.3.2)
    d.set_desc(DESC, 1, table, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE, 0)  # WRITE ignored here
    d.publish(0)
    c = q.pop()
    assert c.readable == [(DATA + 0x40, 2), (DATA, 4)] and c.writable == [(DATA + 16, 4)]


# ---------------------------------------------------------------- hostile chains


def expect_error(q: Virtqueue) -> None:
    with pytest.raises(VirtqueueError):
        q.pop()


@pytest.fixture
def qd() -> tuple[RecordingMemory, Virtqueue, Driver]:
    mem = make_memory()
    return mem, Virtqueue(mem, 8, DESC, AVAIL, USED), Driver(mem, 8)


def test_self_loop(qd) -> None:
    _, q, d = qd
    d.set_desc(DESC, 3, DATA, 4, VIRTQ_DESC_F_NEXT, 3)
    d.publish(3)
    expect_error(q)


def test_two_cycle(qd) -> None:
    _, q, d = qd
    d.set_desc(DESC, 0, DATA, 4, VIRTQ_DESC_F_NEXT, 5)
    d.set_desc(DESC, 5, DATA, 4, VIRTQ_DESC_F_NEXT, 0)
    d.publish(0)
    expect_error(q)


@pytest.mark.parametrize("nxt", [8, 9, 0xFFFF])
def test_bad_next(qd, nxt: int) -> None:
    _, q, d = qd
    d.set_desc(DESC, 0, DATA, 4, VIRTQ_DESC_F_NEXT, nxt)
    d.publish(0)
    expect_error(q)


@pytest.mark.parametrize("head", [8, 100, 0xFFFF])
def test_bad_head(qd, head: int) -> None:
    _, q, d = qd
    d.publish(head)
    expect_error(q)


@pytest.mark.parametrize("idx", [9, 100, 0x8000, 0xFFFF])
def test_bad_avail_idx(qd, idx: int) -> None:
    mem, q, _ = qd
    raw_write(mem, AVAIL + 2, struct.pack("<H", idx))
    expect_error(q)
    with pytest.raises(VirtqueueError):
        q.pending()


@pytest.mark.parametrize(
    "addr, length",
    [
        (DATA, 0xFFFFFFFF),  # huge length from a valid address
        (R1 + R1_SIZE - 4, 8),  # runs off the end of R1
        (R0 - 4, 8),  # starts below guest memory
        (0x20000, 4),  # in the hole
        (R2 - 2, 4),  # ends in R2 but starts in the hole
        ((1 << 64) - 2, 4),  # wraps around 2^64
        (0, 1),
    ],
)
def test_bad_buffer(qd, addr: int, length: int) -> None:
    _, q, d = qd
    d.set_desc(DESC, 0, DATA, 4, VIRTQ_DESC_F_NEXT, 1)
    d.set_desc(DESC, 1, addr, length, VIRTQ_DESC_F_WRITE, 0)
    d.publish(0)
    expect_error(q)


def test_chain_over_4g_total() -> None:
    mem = GuestMemory.anonymous(0x10000, gpa=0x10000)
    q = Virtqueue(mem, 4, 0x10000, 0x10100, 0x10200)
    # zero-length address checks pass, but the sum of lengths exceeds 2^32 before any address is used
    for i in range(2):
        mem.write_struct(0x10000 + 16 * i, virtq_desc, 0x1_0000_0000_0000, 0xFFFFFFFF, VIRTQ_DESC_F_NEXT if i == 0 else 0, 1)
    mem.write_int(0x10104, 2, 0)
    mem.write_int(0x10102, 2, 1)
    with pytest.raises(VirtqueueError):
        q.pop()


def test_readable_after_writable(qd) -> None:
    _, q, d = qd
    d.add_chain([(DATA, 4, True), (DATA + 4, 4, False)])
    expect_error(q)


def test_readable_after_zero_length_writable(qd) -> None:
    _, q, d = qd
    d.add_chain([(DATA, 0, True), (DATA + 4, 4, False)])
    expect_error(q)


def test_indirect_not_negotiated(qd) -> None:
    _, q, d = qd
    d.set_desc(DESC, 0, DATA, 16, VIRTQ_DESC_F_INDIRECT, 0)
    d.publish(0)
    expect_error(q)


@pytest.mark.parametrize(
    "length, flags, inner_flags",
    [
        (0, VIRTQ_DESC_F_INDIRECT, 0),  # empty table
        (24, VIRTQ_DESC_F_INDIRECT, 0),  # not a multiple of 16
        (16 * 9, VIRTQ_DESC_F_INDIRECT, 0),  # more entries than the queue size
        (16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 0),  # INDIRECT with NEXT
        (16, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_INDIRECT),  # nested table
        (32, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT),  # inner next loops to itself
    ],
)
def test_bad_indirect(length: int, flags: int, inner_flags: int) -> None:
    mem = make_memory()
    q, d = Virtqueue(mem, 8, DESC, AVAIL, USED, indirect_desc=True), Driver(mem, 8)
    table = DATA + 0x400
    d.set_desc(table, 0, DATA, 16, inner_flags, 0)
    d.set_desc(table, 1, DATA, 16, inner_flags, 1)
    d.set_desc(DESC, 0, table, length, flags, 1)
    d.set_desc(DESC, 1, DATA, 4, 0, 0)
    d.publish(0)
    expect_error(q)


def test_indirect_table_outside_memory() -> None:
    mem = make_memory()
    q, d = Virtqueue(mem, 8, DESC, AVAIL, USED, indirect_desc=True), Driver(mem, 8)
    d.set_desc(DESC, 0, R2 + R2_SIZE - 16, 32, VIRTQ_DESC_F_INDIRECT, 0)
    d.publish(0)
    expect_error(q)


def test_add_used_rejects_bad_head(qd) -> None:
    _, q, _ = qd
    with pytest.raises(VirtqueueError):
        q.add_used(8, 0)
    with pytest.raises(VirtqueueError):
        q.add_used(0, 1 << 32)


def test_chain_helpers_report_vanished_memory() -> None:
    mem = make_memory()
    c = DescriptorChain(mem, 0, [(0x50000, 4)], [(0x50000, 4)])
    with pytest.raises(VirtqueueError):
        c.read(4)
    with pytest.raises(VirtqueueError):
        c.write(b"1234")


# ---------------------------------------------------------------- property tests

ADDRS = [0, R0 - 16, R0, DATA, DATA + 0x10, R1 - 8, R1, R1 + R1_SIZE - 16, R1 + R1_SIZE, 0x20000, R2, R2 + R2_SIZE - 4, (1 << 64) - 16, (1 << 64) - 1]
LENS = [0, 1, 4, 8, 16, 32, 0x100, 0x1000, 0x4000, 0x7FFFFFFF, 0xFFFFFFFF]


def descriptors(size: int) -> st.SearchStrategy:
    """Descriptors mixing plausible values (so chains get walked) with hostile ones."""
    plausible_addr = st.integers(DATA, DATA + 0xF00)
    addr = st.one_of(plausible_addr, plausible_addr, st.sampled_from(ADDRS), st.integers(0, (1 << 64) - 1))
    small = st.integers(0, 64)
    length = st.one_of(small, small, st.sampled_from(LENS), st.integers(0, (1 << 32) - 1))
    common = st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT])
    flags = st.one_of(common, common, st.integers(0, 7), st.integers(0, 0xFFFF))
    in_range = st.integers(0, size - 1)
    nxt = st.one_of(in_range, in_range, st.integers(0, size + 1), st.integers(0, 0xFFFF))
    return st.tuples(addr, length, flags, nxt)


@st.composite
def hostile_queues(draw: st.DrawFn) -> tuple:
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    table = draw(st.lists(descriptors(size), min_size=size, max_size=size))
    head = st.integers(0, size - 1)
    ring = draw(st.lists(st.one_of(head, head, head, st.integers(0, 0xFFFF)), min_size=size, max_size=size))
    pending = st.integers(1, size)
    avail_idx = draw(st.one_of(pending, pending, st.integers(0, size + 2), st.integers(0, 0xFFFF)))
    avail_flags = draw(st.integers(0, 0xFFFF))
    last = draw(st.one_of(st.just(0), st.just(0), st.integers(0, 0xFFFF)))
    if last:
        avail_idx = (avail_idx + last) & 0xFFFF
    # a plausible indirect table at DATA (the rest of DATA is random garbage)
    extra = draw(st.lists(descriptors(size), max_size=24))
    indirect = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return size, table, ring, avail_idx, avail_flags, last, extra, indirect, seed


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_queues())
def test_hostile_queue_only_raises_virtqueue_error(params: tuple) -> None:
    size, table, ring, avail_idx, avail_flags, last, extra, indirect, seed = params
    mem = make_memory()
    rnd = random.Random(seed)
    raw_write(mem, DATA, rnd.randbytes(0x1000))  # garbage the chain may point at
    for i, desc in enumerate(extra):  # plausible indirect tables at DATA, DATA+0x100, ...
        raw_write(mem, DATA + 16 * i, virtq_desc.pack(*desc))
    for i, desc in enumerate(table):
        raw_write(mem, DESC + 16 * i, virtq_desc.pack(*desc))
    raw_write(mem, AVAIL, struct.pack("<HH", avail_flags, avail_idx) + struct.pack(f"<{size}H", *ring))
    q = Virtqueue(mem, size, DESC, AVAIL, USED, indirect_desc=indirect)
    q.last_avail_idx = last
    for _ in range(size + 2):
        try:
            chain = q.pop()
        except VirtqueueError:
            event("VirtqueueError")
            break
        if chain is None:
            event("empty")
            break
        event("chain")
        check_chain(mem, q, chain)
        try:
            data = chain.read(256)
            assert len(data) == min(256, chain.readable_len)
            chain.write(b"\xAA" * min(4, chain.writable_len))
        except VirtqueueError:
            pytest.fail("a validated chain's buffers must be accessible")
        q.add_used(chain.head, min(4, chain.writable_len))
        q.needs_notification()
    # RecordingMemory asserted every access on the way (none may even be attempted outside)
    assert mem.accesses


def check_chain(mem: GuestMemory, q: Virtqueue, chain: DescriptorChain) -> None:
    assert 0 <= chain.head < q.size
    total = 0
    for gpa, length in chain.readable + chain.writable:
        assert length > 0
        total += length
        end = gpa + length
        pos = gpa
        while pos < end:  # every byte lies in some region
            r = mem.find(pos)
            pos = min(end, r.end)
    assert total <= 1 << 32


@st.composite
def valid_chains(draw: st.DrawFn) -> tuple:
    size = draw(st.sampled_from([4, 8, 16, 32]))
    chains = []
    budget = size
    for _ in range(draw(st.integers(1, 6))):
        if budget == 0:
            break
        n_r = draw(st.integers(0, min(3, budget)))
        n_w = draw(st.integers(0 if n_r else 1, min(3, budget - n_r)))
        if n_r + n_w == 0:
            break
        bufs = [(draw(st.integers(0, 0xF00)), draw(st.integers(0, 0x100)), i >= n_r) for i in range(n_r + n_w)]
        budget -= n_r + n_w
        chains.append(bufs)
    start = draw(st.integers(0, 0xFFFF))
    return size, chains, start


@settings(max_examples=500, deadline=None)
@given(valid_chains())
def test_well_formed_chains_round_trip(params: tuple) -> None:
    size, chains, start = params
    mem = make_memory()
    q, d = Virtqueue(mem, size, DESC, AVAIL, USED), Driver(mem, size)
    d.avail_idx = q.last_avail_idx = q.used_idx = start
    raw_write(mem, AVAIL + 2, struct.pack("<H", start))
    heads = [d.add_chain([(DATA + off, ln, w) for off, ln, w in bufs]) for bufs in chains]
    for head, bufs in zip(heads, chains):
        c = q.pop()
        assert c is not None and c.head == head
        assert c.readable == [(DATA + o, n) for o, n, w in bufs if not w and n]
        assert c.writable == [(DATA + o, n) for o, n, w in bufs if w and n]
        q.add_used(c.head, c.writable_len)
    assert q.pop() is None
    assert d.used_idx() == (start + len(chains)) & 0xFFFF
    for k, (head, bufs) in enumerate(zip(heads, chains)):
        assert d.used_elem(start + k) == (head, sum(n for _, n, w in bufs if w))


def test_guest_memory_error_never_escapes_pop() -> None:
    """Even a queue whose memory region vanished (hot-unplug) reports VirtqueueError."""
    mem = make_memory()
    q, d = Virtqueue(mem, 4, DESC, AVAIL, USED), Driver(mem, 4)
    d.add_chain([(R2, 4, False)])
    mem.strict = False
    mem._regions = [r for r in mem._regions if r.name != "r2"]
    with pytest.raises(VirtqueueError):
        q.pop()
    mem._regions = []  # even the rings are gone
    for op in (q.pop, q.pending, lambda: q.add_used(0, 0)):
        with pytest.raises(VirtqueueError):
            op()
    q.used_idx += 1  # pretend a used entry was added, so the flags are read
    with pytest.raises(VirtqueueError):
        q.needs_notification()
