"""virtio-pmem device (virtio 1.2 section 5.19): flush loop end to end with a real backing file,
a real eventfd and a request queue laid out in guest memory the way Linux's driver does it."""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from pathlib import Path

import pytest

from minivmm.devices.virtio.pmem import (
    VIRTIO_ID_PMEM,
    VIRTIO_PMEM_REQ_TYPE_FLUSH,
    VirtioPmem,
    virtio_pmem_config,
)
from minivmm.devices.virtio.queue import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Virtqueue, virtq_desc
from minivmm.memory import GuestMemory
from minivmm.stats import PmemDeviceStats
from minivmm.pmemfile import PmemSpec, open_backing
from support.idle import epoll_watched, wait_blocked_watching

RAM = 0x4000_0000  # guest RAM does not start at 0 here
QSIZE = 256
DESC = RAM + 0x1000  # 16 * 256 = 0x1000
AVAIL = DESC + 0x1000
USED = RAM + 0x3000  # page aligned, like a legacy vring
REQS = RAM + 0x10000  # one 16-byte slot per request: le32 type at +0, le32 ret at +8
TIMEOUT = 10.0


class LinuxLikeDriver:
    """The guest side: like nd_virtio.c, each request is [req (4 bytes, readable), resp (4, writable)]."""

    def __init__(self, mem: GuestMemory, size: int = QSIZE) -> None:
        self.mem, self.size = mem, size
        self.avail_idx = 0
        self.next_desc = 0
        self.submitted: dict[int, float] = {}  # head -> monotonic time just before publishing

    def queue(self) -> Virtqueue:
        return Virtqueue(self.mem, self.size, DESC, AVAIL, USED)

    def add(self, req_type: int = VIRTIO_PMEM_REQ_TYPE_FLUSH, descs: list[tuple[int, int, int]] | None = None) -> int:
        head = self.next_desc
        slot = REQS + 16 * (head // 2)
        self.mem.write_int(slot, 4, req_type)
        self.mem.write_int(slot + 8, 4, 0xDEADBEEF)
        if descs is None:
            descs = [(slot, 4, 0), (slot + 8, 4, VIRTQ_DESC_F_WRITE)]
        for k, (addr, length, flags) in enumerate(descs):
            nxt = (head + k + 1) % self.size
            if k + 1 < len(descs):
                flags |= VIRTQ_DESC_F_NEXT
            self.mem.write_struct(DESC + 16 * ((head + k) % self.size), virtq_desc, addr, length, flags, nxt)
        self.next_desc = (head + max(2, len(descs))) % self.size
        self.mem.write_int(AVAIL + 4 + 2 * (self.avail_idx % self.size), 2, head)
        self.submitted[head] = time.monotonic()
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_int(AVAIL + 2, 2, self.avail_idx)  # publish
        return head

    def ret(self, head: int) -> int:
        return self.mem.read_int(REQS + 16 * (head // 2) + 8, 4)

    def used_idx(self) -> int:
        return self.mem.read_int(USED + 2, 2)

    def used(self, i: int) -> tuple[int, int]:
        return struct.unpack("<II", self.mem.read(USED + 4 + 8 * (i % self.size), 8))

    def wait_used(self, n: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.used_idx() != n:
            assert time.monotonic() < deadline, f"used.idx stuck at {self.used_idx()}, expected {n}"
            time.sleep(0.001)


class Harness:
    """A device activated on a real eventfd, with recording signal_used / needs_reset."""

    def __init__(self, dev: VirtioPmem, mem: GuestMemory | None = None) -> None:
        self.dev = dev
        self.mem = mem or GuestMemory.anonymous(0x100000, gpa=RAM)
        self.driver = LinuxLikeDriver(self.mem)
        self.notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.signals: list[tuple[int, float, int]] = []  # (queue, time, used.idx then)
        self.reset_requested = threading.Event()

    def signal_used(self, q: int) -> None:
        self.signals.append((q, time.monotonic(), self.driver.used_idx()))

    def activate(self) -> None:
        self.dev.activate(self.mem, [self.driver.queue()], [self.notify], self.signal_used, self.reset_requested.set)

    def kick(self) -> None:
        os.eventfd_write(self.notify, 1)

    def wait_idle(self) -> None:
        """Wait until the flusher has finished its batches and waits for the next kick (in
        epoll on its stop pipe and the notify eventfd): after that, nothing more happens."""
        flusher = self.dev._flusher
        assert flusher is not None
        wait_blocked_watching(flusher.thread, {flusher.stop_r, self.notify})

    def close(self) -> None:
        self.dev.reset()
        os.close(self.notify)


@pytest.fixture
def backing(tmp_path: Path):
    b = open_backing(PmemSpec(str(tmp_path / "disk.img"), size=2 << 20))
    yield b
    b.close()


@pytest.fixture
def harness(backing):
    h = Harness(VirtioPmem.from_backing(backing, start=0x1_0000_0000))
    yield h
    h.close()
    assert h.dev.errors == []


@pytest.fixture
def fsync_calls(monkeypatch, backing):
    """Count real fdatasync calls on the backing fd (and pass them through)."""
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        if fd == backing.fd:
            calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return calls


def test_identity_and_config(backing) -> None:
    dev = VirtioPmem.from_backing(backing, start=0x1_0000_0000)
    assert dev.device_id == VIRTIO_ID_PMEM == 27
    assert dev.device_features == 0 and list(dev.queue_max_sizes) == [256]
    raw = virtio_pmem_config.pack(0x1_0000_0000, 2 << 20)
    for off in range(16):
        for size in (1, 2, 4, 8):
            assert dev.read_config(off, size) == int.from_bytes(raw[off : off + size], "little")
    assert dev.read_config(0, 8) == 0x1_0000_0000 and dev.read_config(8, 8) == 2 << 20
    assert dev.read_config(4, 4) == 1 and dev.read_config(16, 4) == 0 and dev.read_config(100, 8) == 0
    dev.write_config(0, 8, 0x1234)
    assert dev.read_config(0, 8) == 0x1_0000_0000


def test_flush_end_to_end(harness, fsync_calls, backing) -> None:
    backing.mapping[:5] = b"hello"  # a guest store into the pmem range
    harness.activate()
    d = harness.driver
    head = d.add()
    harness.kick()
    d.wait_used(1)
    harness.wait_idle()
    assert d.ret(head) == 0
    assert d.used(0) == (head, 4)
    assert len(fsync_calls) == 1
    assert [s[0] for s in harness.signals] == [0]
    with open(backing.path, "rb") as f:
        assert f.read(5) == b"hello"
    st = harness.dev.stats()
    assert st.flush_requests == 1 and st.host_fsyncs == 1 and st.batches == 1
    assert st.service_time_max >= st.fsync_time_max > 0
    assert not harness.reset_requested.is_set()


def test_unknown_type_is_an_error(harness, fsync_calls) -> None:
    harness.activate()
    d = harness.driver
    bad = d.add(req_type=7)
    harness.kick()
    d.wait_used(1)
    assert d.ret(bad) != 0
    assert fsync_calls == []  # nothing to flush
    good = d.add()
    harness.kick()
    d.wait_used(2)
    harness.wait_idle()
    assert d.ret(good) == 0 and len(fsync_calls) == 1
    assert harness.dev.stats().bad_requests == 1
    assert not harness.reset_requested.is_set()


@pytest.mark.parametrize(
    "descs",
    [
        [(REQS, 4, 0)],  # no response buffer
        [(REQS + 8, 4, VIRTQ_DESC_F_WRITE)],  # no request buffer
        [(REQS, 2, 0), (REQS + 8, 4, VIRTQ_DESC_F_WRITE)],  # short request
        [(REQS, 4, 0), (REQS + 8, 3, VIRTQ_DESC_F_WRITE)],  # short response
        [(REQS + 8, 4, VIRTQ_DESC_F_WRITE), (REQS, 4, 0)],  # readable after writable
        [(REQS, 4, 0), (0x7000_0000, 4, VIRTQ_DESC_F_WRITE)],  # response outside guest memory
    ],
)
def test_malformed_chain_needs_reset(harness, fsync_calls, descs) -> None:
    harness.activate()
    d = harness.driver
    d.add(descs=descs)
    harness.kick()
    assert harness.reset_requested.wait(TIMEOUT)
    # The queue is no longer served until reset: the flusher waits on its stop pipe alone,
    # so a kick cannot wake it (an explicit idle state, not a pause).
    flusher = harness.dev._flusher
    wait_blocked_watching(flusher.thread, {flusher.stop_r})
    assert d.used_idx() == 0 and fsync_calls == []
    try:
        os.eventfd_read(harness.notify)  # the first kick, if the flusher found the chain without it
    except BlockingIOError:
        pass
    d.add()
    harness.kick()
    assert epoll_watched(flusher.thread) == {flusher.stop_r}
    assert os.eventfd_read(harness.notify) == 1  # the kick is still there: nobody consumed it
    assert d.used_idx() == 0
    assert harness.dev.errors == [] and harness.dev.stats().malformed == 1


def test_good_requests_before_a_malformed_one_complete(harness) -> None:
    d = harness.driver
    good = d.add()
    d.add(descs=[(REQS, 4, 0)])
    harness.activate()  # both were already available: served without a kick
    assert harness.reset_requested.wait(TIMEOUT)
    d.wait_used(1)
    assert d.used(0)[0] == good and d.ret(good) == 0


def test_fsync_failure_reports_error(harness, backing, monkeypatch) -> None:
    real = os.fdatasync

    def failing(fd: int) -> None:
        if fd == backing.fd:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", failing)
    harness.activate()
    d = harness.driver
    heads = [d.add(), d.add()]
    harness.kick()
    d.wait_used(2)
    assert all(d.ret(h) != 0 for h in heads)
    st = harness.dev.stats()
    assert st.fsync_errors == 1 and st.host_fsyncs == 1
    assert st.flush_failed_errno == errno.EIO
    monkeypatch.setattr(os, "fdatasync", real)  # the host would succeed now, but the data is gone
    h = d.add()
    harness.kick()
    d.wait_used(3)
    harness.wait_idle()
    assert d.ret(h) != 0  # sticky (issue 9 item 1): never reported durable again
    assert not harness.reset_requested.is_set()


def _fail_fdatasync_once(monkeypatch, fd: int) -> list[int]:
    """Make the next fdatasync of `fd` raise EIO, later ones pass through; returns the call log."""
    real = os.fdatasync
    calls: list[int] = []

    def once(f: int) -> None:
        if f == fd:
            calls.append(f)
            if len(calls) == 1:
                raise OSError(errno.EIO, "Input/output error")
        real(f)

    monkeypatch.setattr(os, "fdatasync", once)
    return calls


def _flush(harness: Harness) -> int:
    """One FLUSH request, kicked and completed; its ret."""
    d = harness.driver
    head = d.add()
    harness.kick()
    d.wait_used(d.avail_idx)
    return d.ret(head)


def test_flush_failure_is_sticky_across_reset(harness, backing, monkeypatch, capfd) -> None:
    """One failed fdatasync: the first flush and EVERY later one fail, also after a device reset
    and re-activation (the failure belongs to the file); said once on stderr; in the stats."""
    calls = _fail_fdatasync_once(monkeypatch, backing.fd)
    harness.activate()
    assert _flush(harness) != 0
    assert all(_flush(harness) != 0 for _ in range(5))
    harness.dev.reset()
    harness.mem.write(RAM, bytes(0x20000))  # the driver re-initialises its rings
    harness.driver = LinuxLikeDriver(harness.mem)
    harness.activate()
    assert all(_flush(harness) != 0 for _ in range(5))
    assert len(calls) == 1  # never asked the host again: its success would be a lie
    harness.wait_idle()
    st = harness.dev.stats()
    assert st.flush_failed_errno == errno.EIO and st.fsync_errors == 1
    assert st.flush_requests == 11
    shown = PmemDeviceStats(backing.id, str(backing.path), st)  # what --stats and the JSON say
    assert f"FLUSHES FAILING since errno {errno.EIO}" in shown.render_text()
    assert PmemDeviceStats.from_dict(shown.to_dict()).counters.flush_failed_errno == errno.EIO
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "fdatasync" in line]
    assert len(lines) == 1, err
    assert backing.id in lines[0] and str(backing.path) in lines[0] and "EIO" in lines[0]


def test_fail_flushes_from_outside(harness, fsync_calls, capfd) -> None:
    """The machine can make flushes fail for another reason (an unbackable page): same rules."""
    harness.activate()
    assert _flush(harness) == 0
    harness.dev.fail_flushes(errno.EFAULT, "guest page at offset 0x1000")
    harness.dev.fail_flushes(errno.EIO, "again")  # the first cause stays, no second message
    assert _flush(harness) != 0 and _flush(harness) != 0
    assert len(fsync_calls) == 1
    assert harness.dev.stats().flush_failed_errno == errno.EFAULT
    assert capfd.readouterr().err.count("every later flush") == 1


def test_group_commit(harness, backing, monkeypatch) -> None:
    """Requests arriving during a slow fsync share the next one; every ack is covered by an
    fsync that started after the request was made available."""
    real = os.fdatasync
    fsyncs: list[tuple[float, float]] = []
    started, release = threading.Event(), threading.Event()

    def slow(fd: int) -> None:
        if fd != backing.fd:
            return real(fd)
        t0 = time.monotonic()
        started.set()
        release.wait(TIMEOUT)  # the first fsync lasts until every other request has arrived
        real(fd)
        fsyncs.append((t0, time.monotonic()))

    monkeypatch.setattr(os, "fdatasync", slow)
    harness.activate()
    d = harness.driver
    n = 40
    d.add()
    harness.kick()
    assert started.wait(TIMEOUT)
    for _ in range(n - 1):  # all arrive while the first fsync runs
        d.add()
        harness.kick()
    release.set()
    d.wait_used(n)
    assert len(fsyncs) == 2  # the first request's, then one for the 39 that arrived during it
    assert all(d.ret(head) == 0 for head in d.submitted)
    # ack time of each used entry: the signal_used call that first saw it in the used ring
    acked: dict[int, float] = {}
    for _, when, used_idx in harness.signals:
        for i in range(used_idx):
            acked.setdefault(d.used(i)[0], when)
    assert set(acked) == set(d.submitted)
    for head, submitted in d.submitted.items():
        covering = [s for s, e in fsyncs if s > submitted and e <= acked[head]]
        assert covering, f"request {head} acknowledged without an fsync started after it"
    assert harness.dev.stats().host_fsyncs == len(fsyncs)


def test_no_interrupt_flag_suppresses_signal(harness) -> None:
    harness.mem.write_int(AVAIL, 2, VIRTQ_AVAIL_F_NO_INTERRUPT)
    harness.activate()
    harness.driver.add()
    harness.kick()
    harness.driver.wait_used(1)
    harness.wait_idle()
    assert harness.dev.stats().batches == 1 and harness.signals == []


def test_reset_and_reactivate(harness, fsync_calls) -> None:
    harness.activate()
    flusher = harness.dev._flusher
    harness.dev.reset()
    assert not flusher.thread.is_alive() and not harness.dev.active
    harness.dev.reset()  # idempotent
    # a fresh queue after reset (the driver re-initialises its rings)
    harness.mem.write(RAM, bytes(0x10000))
    harness.driver = LinuxLikeDriver(harness.mem)
    harness.activate()
    head = harness.driver.add()
    harness.kick()
    harness.driver.wait_used(1)
    assert harness.driver.ret(head) == 0 and len(fsync_calls) == 1
    harness.activate()  # activate while active restarts cleanly
    assert harness.dev.active


def test_flush_does_not_block_other_threads(harness, backing, monkeypatch) -> None:
    """The fsync runs on the device's own thread: the caller of activate/kick is never blocked."""
    real = os.fdatasync
    entered, release = threading.Event(), threading.Event()

    def stuck(fd: int) -> None:
        if fd == backing.fd:
            entered.set()
            release.wait(TIMEOUT)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", stuck)
    harness.activate()
    t0 = time.monotonic()
    harness.driver.add()
    harness.kick()
    assert time.monotonic() - t0 < 0.5
    assert entered.wait(TIMEOUT)  # the flusher thread is inside the fsync...
    assert harness.driver.used_idx() == 0  # ...so the request is not acknowledged yet
    release.set()
    harness.driver.wait_used(1)


def test_discard_writes(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "base.img"
    original = bytes(range(256)) * (8192 * 4)  # 8 MiB... of which 2 MiB used below
    path.write_bytes(original[: 2 << 20])
    before = path.stat()
    b = open_backing(PmemSpec(str(path), discard_writes=True))
    calls: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    try:
        assert b.discard_writes and b.size == 2 << 20
        b.mapping[:4] = b"XXXX"  # the guest writes: private copy-on-write page
        b.mapping[(1 << 20) : (1 << 20) + 3] = b"YYY"
        assert b.mapping[:4] == b"XXXX"
        h = Harness(VirtioPmem.from_backing(b, start=0x1_0000_0000))
        try:
            h.activate()
            head = h.driver.add()
            h.kick()
            h.driver.wait_used(1)
            assert h.driver.ret(head) == 0
            assert calls == [] and h.dev.stats().host_fsyncs == 0 and h.dev.stats().flush_requests == 1
        finally:
            h.close()
    finally:
        b.close()
    assert path.read_bytes() == original[: 2 << 20]
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_writes_reach_the_file_through_the_shared_mapping(backing) -> None:
    backing.mapping[100:104] = b"abcd"
    os.fdatasync(backing.fd)
    with open(backing.path, "rb") as f:
        f.seek(100)
        assert f.read(4) == b"abcd"


def test_an_unexpected_flusher_exception_is_reported_and_needs_reset(backing, capfd) -> None:
    """A device bug on the flusher thread reaches stderr in one line and the device's error
    list (statistics count it), and the device asks for a reset instead of dying silently."""
    h = Harness(VirtioPmem.from_backing(backing, start=0x1_0000_0000))

    def broken(*args: object) -> bool:
        raise RuntimeError("boom")

    h.dev.process_batch = broken  # type: ignore[method-assign]
    h.activate()
    h.driver.add()
    h.kick()
    assert h.reset_requested.wait(TIMEOUT)
    h.close()
    assert [str(e) for e in h.dev.errors] == ["boom"]
    assert f"minivmm: {h.dev.name} flusher failed: RuntimeError: boom\n" in capfd.readouterr().err
