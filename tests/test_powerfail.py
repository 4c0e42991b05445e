"""Power-failure simulation (minivmm.powerfail, minivmm.flushlog): the dirty-page copier with
fake bitmaps, KVM's dirty log for real with a tiny guest, the flush log and its replay
(truncated and corrupt logs), the options, the console escape and the monitor command."""

# ruff: noqa: F811  (test functions take the imported fixtures as parameters)
from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from minivmm.devices.console import Console
from minivmm.errors import UserError
from minivmm.eventloop import EventLoop
from minivmm.flushlog import (
    FLUSHLOG_MAGIC,
    FlushLogWriter,
    flushlog_header,
    flushlog_record,
    list_epochs,
    read_log,
    record_bytes,
    replay,
)
from minivmm.machine import Machine, MachineConfig
from minivmm.memory import Region
from minivmm.monitor.commands import dispatch
from minivmm.monitor.objects import spec_from_object, specs_from_command_line
from minivmm.pmemfile import PmemSpec, open_backing, parse_pmem_option
from minivmm.powerfail import PAGE_SIZE, DirtyPageCopier, PowerCutError, dirty_pages, page_runs
from tinyguest import Asm, kick_handler, make_guest  # noqa: F401  (pytest fixtures, used by name)

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


def bitmap(npages: int, *pages: int) -> bytes:
    """A KVM dirty bitmap (64-bit words, bit i of byte i // 8) with `pages` set."""
    data = bytearray((npages + 63) // 64 * 8)
    for p in pages:
        data[p // 8] |= 1 << (p % 8)
    return bytes(data)


class FakeLog:
    """A dirty log fed by the test: each fetch returns (and clears) what was marked."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.marked: set[int] = set()
        self.fetches = 0

    def mark(self, *pages: int) -> None:
        self.marked.update(pages)

    def fetch(self) -> bytes:
        self.fetches += 1
        pages, self.marked = self.marked, set()
        return bitmap(self.npages, *pages)


@pytest.fixture
def backing_file(tmp_path: Path):
    """A 16-page file of 0xEE bytes, its O_RDWR fd and a private (copy-on-write) mapping of it."""
    path = tmp_path / "img"
    path.write_bytes(b"\xee" * 16 * PAGE_SIZE)
    fd = os.open(path, os.O_RDWR)
    mapping = mmap.mmap(fd, 16 * PAGE_SIZE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    yield path, fd, mapping
    mapping.close()
    os.close(fd)


# -- bitmaps --------------------------------------------------------------------------------
def test_dirty_pages_and_runs() -> None:
    assert dirty_pages(bitmap(130, 0, 7, 8, 63, 64, 129), 130) == [0, 7, 8, 63, 64, 129]
    assert dirty_pages(bitmap(128, 5, 127), 100) == [5]  # bits past the slot are ignored
    assert dirty_pages(bytes(16), 128) == []
    assert page_runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 1), (7, 2)]
    assert page_runs([]) == []


# -- the copier (fake bitmaps) -----------------------------------------------------------------
def test_flush_copies_exactly_the_logged_pages(backing_file) -> None:
    path, fd, mapping = backing_file
    log = FakeLog(16)
    copier = DirtyPageCopier(fd, memoryview(mapping), log.fetch)
    for page in (1, 2, 9, 15):
        mapping[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = bytes([page]) * PAGE_SIZE
    assert path.read_bytes() == b"\xee" * 16 * PAGE_SIZE  # private: nothing reached the file
    log.mark(1, 2, 15)  # page 9 changed but is not in the log: it must not be copied
    copier.flush()
    data = path.read_bytes()
    for page in range(16):
        want = bytes([page]) if page in (1, 2, 15) else b"\xee"
        assert data[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] == want * PAGE_SIZE, page
    assert (copier.epoch, copier.stats.flushes, copier.stats.pages_copied, copier.stats.max_pages) == (1, 1, 3, 3)
    copier.flush()  # nothing dirty: the file stays, the epoch still counts
    assert path.read_bytes() == data and copier.epoch == 2 and copier.stats.pages_copied == 3


def test_a_write_racing_with_a_flush_lands_in_the_next_one(backing_file) -> None:
    """The log is fetched (and cleared) before the copy: a store just after the fetch sets its
    bit again, so whatever the copy saw, the next flush writes the final bytes."""
    path, fd, mapping = backing_file
    log = FakeLog(16)

    def fetch_then_guest_writes() -> bytes:
        got = log.fetch()
        mapping[3 * PAGE_SIZE : 3 * PAGE_SIZE + 4] = b"late"  # the guest, right after the fetch
        log.mark(3)  # KVM logs it in the fresh log
        return got

    copier = DirtyPageCopier(fd, memoryview(mapping), fetch_then_guest_writes)
    mapping[3 * PAGE_SIZE : 3 * PAGE_SIZE + 5] = b"early"
    log.mark(3)
    copier.flush()
    copier.flush()
    assert path.read_bytes()[3 * PAGE_SIZE : 3 * PAGE_SIZE + 5] == b"latey"
    assert path.read_bytes() == bytes(mapping)


def test_power_cut_counts_dirty_pages_and_refuses_later_flushes(backing_file) -> None:
    path, fd, mapping = backing_file
    log = FakeLog(16)
    copier = DirtyPageCopier(fd, memoryview(mapping), log.fetch)
    mapping[0:1] = b"A"
    log.mark(0)
    copier.flush()
    mapping[PAGE_SIZE : PAGE_SIZE + 1] = b"B"
    mapping[5 * PAGE_SIZE : 5 * PAGE_SIZE + 1] = b"C"
    log.mark(1, 5)
    copier.cut_power()
    assert copier.dropped_pages() == 2
    with pytest.raises(PowerCutError):
        copier.flush()
    data = path.read_bytes()
    assert data[0:1] == b"A" and data[PAGE_SIZE : PAGE_SIZE + 1] == b"\xee" and data[5 * PAGE_SIZE] == 0xEE


def test_a_power_cut_waits_for_the_flush_in_progress(backing_file) -> None:
    path, fd, mapping = backing_file
    inside, release = threading.Event(), threading.Event()
    log = FakeLog(16)

    def slow_fetch() -> bytes:
        inside.set()
        release.wait(5)
        return log.fetch()

    copier = DirtyPageCopier(fd, memoryview(mapping), slow_fetch)
    mapping[0:4] = b"done"
    log.mark(0)
    flusher = threading.Thread(target=copier.flush)
    flusher.start()
    assert inside.wait(5)
    cutter = threading.Thread(target=copier.cut_power)
    cutter.start()
    cutter.join(0.2)
    assert cutter.is_alive()  # blocked behind the flush
    release.set()
    flusher.join(5)
    cutter.join(5)
    assert path.read_bytes()[:4] == b"done" and copier.cut


# -- KVM's dirty log, for real ---------------------------------------------------------------
LOGGED_GPA = 0x4000_0000  # 1 GiB: inside the tiny guest's identity map, clear of its RAM
LOGGED_PAGES = 16


def test_kvm_dirty_log_of_a_slot_and_the_copier_on_it(make_guest, tmp_path: Path) -> None:
    """A long-mode tiny guest stores into a slot registered with KVM_MEM_LOG_DIRTY_PAGES that
    maps a file MAP_PRIVATE: KVM_GET_DIRTY_LOG names exactly the pages stored to (and is
    cleared by the call); the copier on that log writes those pages, and only those, to the file."""
    g = make_guest(long_mode=True)
    path = tmp_path / "img"
    path.write_bytes(b"\xee" * LOGGED_PAGES * PAGE_SIZE)
    fd = os.open(path, os.O_RDWR)
    mapping = mmap.mmap(fd, LOGGED_PAGES * PAGE_SIZE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        region = g.mem.add_region(Region(LOGGED_GPA, LOGGED_PAGES * PAGE_SIZE, mapping, "logged", log_dirty=True))
        g.vm.map_memory(1, LOGGED_GPA, mapping, region.size, log_dirty=True)
        assert dirty_pages(g.vm.get_dirty_log(1, LOGGED_PAGES), LOGGED_PAGES) == []
        mapping[7 * PAGE_SIZE : 7 * PAGE_SIZE + 4] = b"host"  # the VMM's own write: not the guest's
        asm = Asm(64)
        for page, value in ((1, 0x1111), (3, 0x3333), (3, 0x3334), (12, 0xCCCC)):
            asm.mov_acc_imm(8, value).store_acc(LOGGED_GPA + page * PAGE_SIZE + 8, 8)
        g.run_ok(asm.done())
        copier = DirtyPageCopier(fd, region.view, lambda: g.vm.get_dirty_log(1, LOGGED_PAGES))
        copier.flush()
        assert copier.stats.pages_copied == 3
        assert dirty_pages(g.vm.get_dirty_log(1, LOGGED_PAGES), LOGGED_PAGES) == []  # the flush cleared it
        data = path.read_bytes()
        for page in range(LOGGED_PAGES):
            chunk = data[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
            if page in (1, 3, 12):
                value = {1: 0x1111, 3: 0x3334, 12: 0xCCCC}[page]
                assert chunk == b"\xee" * 8 + value.to_bytes(8, "little") + b"\xee" * (PAGE_SIZE - 16), page
            else:
                assert chunk == b"\xee" * PAGE_SIZE, page  # page 7 too: only the log decides
    finally:
        region.view.release()
        mapping.close()
        os.close(fd)


# -- the flush log ----------------------------------------------------------------------------
def page(byte: int) -> bytes:
    return bytes([byte]) * PAGE_SIZE


def write_log(path: Path, image_size: int = 8 * PAGE_SIZE) -> None:
    writer = FlushLogWriter(str(path), PAGE_SIZE, image_size)
    writer.append(1, [0, 2 * PAGE_SIZE], [page(1), page(2)])
    writer.append(2, [], [])
    writer.append(3, [2 * PAGE_SIZE, 7 * PAGE_SIZE], [page(3), page(7)])
    writer.close()


def test_flush_log_layout(tmp_path: Path) -> None:
    log = tmp_path / "log"
    write_log(log)
    data = log.read_bytes()
    assert flushlog_header.unpack_from(data) == (FLUSHLOG_MAGIC, 1, PAGE_SIZE, 8 * PAGE_SIZE)
    magic, npages, epoch, _crc, reserved = flushlog_record.unpack_from(data, flushlog_header.size)
    assert (magic, npages, epoch, reserved) == (b"FLSH", 2, 1, 0)
    offsets = struct.unpack_from("<2Q", data, flushlog_header.size + flushlog_record.size)
    assert offsets == (0, 2 * PAGE_SIZE)
    record_size = flushlog_record.size + 2 * (8 + PAGE_SIZE)
    assert data[flushlog_header.size : flushlog_header.size + record_size] == record_bytes(1, [0, 2 * PAGE_SIZE], [page(1), page(2)])
    assert len(data) == flushlog_header.size + 2 * record_size + flushlog_record.size
    parsed = read_log(str(log))
    assert [(r.epoch, r.offsets) for r in parsed.records] == [(1, [0, 2 * PAGE_SIZE]), (2, []), (3, [2 * PAGE_SIZE, 7 * PAGE_SIZE])]
    assert parsed.warning is None


@pytest.mark.parametrize("upto", [0, 1, 2, 3, None])
def test_replay_upto(tmp_path: Path, upto: int | None) -> None:
    log, image = tmp_path / "log", tmp_path / "image"
    write_log(log)
    image.write_bytes(page(0xEE) * 8)
    warnings: list[str] = []
    applied = replay(str(log), str(image), upto, warnings.append)
    want = [page(0xEE)] * 8
    if upto is None or upto >= 1:
        want[0], want[2] = page(1), page(2)
    if upto is None or upto >= 3:
        want[2], want[7] = page(3), page(7)
    assert image.read_bytes() == b"".join(want)
    assert applied == (3 if upto is None else upto) and warnings == []


def test_truncated_log_replays_up_to_its_last_whole_record(tmp_path: Path) -> None:
    log, image = tmp_path / "log", tmp_path / "image"
    write_log(log)
    whole = log.read_bytes()
    last_record = len(whole) - (flushlog_record.size + 2 * (8 + PAGE_SIZE))
    for cut in (last_record + 1, last_record + flushlog_record.size, len(whole) - 1):
        log.write_bytes(whole[:cut])
        image.write_bytes(page(0xEE) * 8)
        warnings: list[str] = []
        assert replay(str(log), str(image), None, warnings.append) == 2
        assert len(warnings) == 1 and "truncated" in warnings[0] and "up to epoch 2" in warnings[0], warnings
        assert image.read_bytes()[2 * PAGE_SIZE : 3 * PAGE_SIZE] == page(2)
        assert image.read_bytes()[7 * PAGE_SIZE :] == page(0xEE)
        with pytest.raises(UserError, match="last whole record is epoch 2"):
            replay(str(log), str(image), 3, warnings.append)
    log.write_bytes(whole[:last_record])  # cut exactly between records: a whole log, no warning
    warnings.clear()
    assert list_epochs(str(log), warnings.append) == [(1, 2), (2, 0)] and warnings == []


def test_corrupt_record_stops_the_replay(tmp_path: Path) -> None:
    log, image = tmp_path / "log", tmp_path / "image"
    write_log(log)
    data = bytearray(log.read_bytes())
    data[-5] ^= 0x40  # a bit of epoch 3's last page
    log.write_bytes(bytes(data))
    image.write_bytes(page(0xEE) * 8)
    warnings: list[str] = []
    assert replay(str(log), str(image), None, warnings.append) == 2
    assert warnings == [f"flush log {log}: checksum mismatch in record (epoch 3) at offset {len(data) - (flushlog_record.size + 2 * (8 + PAGE_SIZE))}; replaying up to epoch 2"]
    assert image.read_bytes()[2 * PAGE_SIZE : 3 * PAGE_SIZE] == page(2)
    data = bytearray(log.read_bytes())
    data[flushlog_header.size] = ord("X")  # the first record's magic
    log.write_bytes(bytes(data))
    warnings.clear()
    assert list_epochs(str(log), warnings.append) == []
    assert "bad record magic" in warnings[0] and "up to epoch 0" in warnings[0]


def test_log_and_image_errors(tmp_path: Path) -> None:
    log, image = tmp_path / "log", tmp_path / "image"
    log.write_bytes(b"not a log at all, long enough for a header")
    with pytest.raises(UserError, match="not a minivmm flush log"):
        read_log(str(log))
    log.write_bytes(b"short")
    with pytest.raises(UserError, match="too short"):
        read_log(str(log))
    write_log(log)
    image.write_bytes(page(0) * 4)
    with pytest.raises(UserError, match="the log's image had"):
        replay(str(log), str(image), None, print)
    assert image.read_bytes() == page(0) * 4
    with pytest.raises(UserError, match="No such file"):
        replay(str(log), str(tmp_path / "missing"), None, print)


def minivmm(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "minivmm", *args], capture_output=True, text=True, env=env, check=False)


def test_replay_command_line(tmp_path: Path) -> None:
    log, image = tmp_path / "log", tmp_path / "image"
    write_log(log)
    image.write_bytes(page(0xEE) * 8)
    listed = minivmm("pmem", "replay", str(log), "--list")
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "epoch 1: 2 page(s)\nepoch 2: 0 page(s)\nepoch 3: 2 page(s)\n", "")
    done = minivmm("pmem", "replay", str(log), str(image), "--upto", "1")
    assert (done.returncode, done.stdout) == (0, f"{image}: as after flush 1\n")
    assert image.read_bytes()[2 * PAGE_SIZE : 3 * PAGE_SIZE] == page(2)
    log.write_bytes(log.read_bytes()[:-1])
    cut = minivmm("pmem", "replay", str(log), "--list")
    assert cut.returncode == 0 and cut.stdout.count("\n") == 2
    assert cut.stderr.count("\n") == 1 and cut.stderr.startswith("minivmm: warning: flush log")
    for args, message in (
        ((str(log),), "give the IMAGE"),
        ((str(log), str(image), "--upto", "9"), "last whole record is epoch 2"),
        ((str(log), str(image), "--list"), "takes only the LOG"),
        ((str(tmp_path / "nolog"), "--list"), "No such file"),
    ):
        bad = minivmm("pmem", "replay", *args)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and message in bad.stderr, (args, bad.stderr)


# -- options ----------------------------------------------------------------------------------
def test_pmem_options(tmp_path: Path) -> None:
    spec = parse_pmem_option("a.img,size=2M,lose-unflushed=on,flush-log=f.log")
    assert (spec.lose_unflushed, spec.flush_log, spec.discard_writes) == (True, "f.log", False)
    assert parse_pmem_option("a.img,lose-unflushed=off").lose_unflushed is False
    for text, message in (
        ("a.img,lose-unflushed=yes", "lose-unflushed must be on or off"),
        ("a.img,flush-log=f.log", "flush-log= needs lose-unflushed=on"),
        ("a.img,lose-unflushed=on,discard-writes=on", "cannot be combined with discard-writes=on"),
    ):
        with pytest.raises(UserError, match=message):
            parse_pmem_option(text)


def test_lose_unflushed_mapping_is_private_on_a_writable_fd(tmp_path: Path) -> None:
    path = tmp_path / "p.img"
    backing = open_backing(PmemSpec(str(path), 2 * MiB, lose_unflushed=True))
    try:
        backing.mapping[:4] = b"gone"
        assert path.read_bytes()[:4] == bytes(4)  # MAP_PRIVATE: the guest's writes stay in memory
        os.pwrite(backing.fd, b"kept", 0)  # the copier's pwrite works on the fd
        assert path.read_bytes()[:4] == b"kept"
    finally:
        backing.close()


def test_object_property(tmp_path: Path) -> None:
    props = {"qom-type": "memory-backend-file", "id": "m", "mem-path": str(tmp_path / "x"), "size": 2 * MiB, "share": True}
    assert spec_from_object({**props, "lose-unflushed": True}).lose_unflushed
    with pytest.raises(UserError, match="needs share=on"):
        spec_from_object({**props, "share": False, "lose-unflushed": True})
    with pytest.raises(UserError, match="expects a boolean"):
        spec_from_object({**props, "lose-unflushed": "on"})
    (spec,) = specs_from_command_line([f"memory-backend-file,id=m,mem-path={tmp_path / 'x'},size=2M,share=on,lose-unflushed=on"],
                                      ["virtio-pmem-pci,memdev=m,id=p"])  # fmt: skip
    assert spec.lose_unflushed and spec.id == "p"


# -- the console escape and the monitor command -----------------------------------------------
def test_ctrl_a_p_cuts_the_power() -> None:
    loop = EventLoop()
    loop.start()
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    cuts = threading.Event()
    console = Console(loop, on_quit=lambda: None, stdin_fd=r, stdout_fd=out_w, on_power_cut=cuts.set)
    try:
        with console:
            os.write(w, b"\x01p")
            assert cuts.wait(5)
            assert not console.quit_requested
    finally:
        loop.stop()
        loop.close()
        for fd in (r, w, out_r, out_w):
            os.close(fd)


def test_x_power_cut_on_an_assembled_machine(tmp_path: Path) -> None:
    """QMP x-power-cut on a real (never booted) machine with a lose-unflushed device: the
    stop is requested, the device's copier refuses flushes, the reply counts dropped pages."""
    specs = [PmemSpec(str(tmp_path / "p0.img"), 2 * MiB, "pmem0", lose_unflushed=True, flush_log=str(tmp_path / "log")),
             PmemSpec(str(tmp_path / "p1.img"), 2 * MiB, "pmem1")]  # fmt: skip
    with Machine(MachineConfig(kernel=tmp_path / "never-booted", pmem=specs)) as m:
        assert len(m.copiers) == 1 and m.pmem_plugged[0][0].flush_target is m.copiers[0]
        assert m.pmem_plugged[1][0].flush_target is None
        assert m.mem.find(m.pmem_plugged[0][0].start).log_dirty
        assert dispatch(m.monitor, "x-power-cut", {}) == {"dropped-pages": 0}
        assert m.run_state == "shutdown" and m.copiers[0].cut
        assert m.monitor.hmp.execute("power_cut") == "power cut: 0 dirty page(s) dropped\n"
    assert read_log(str(tmp_path / "log")).records == []  # header only: no flush happened
    image = tmp_path / "p0.img"
    before = image.read_bytes()
    same = [PmemSpec(str(image), 2 * MiB, "pmem0", lose_unflushed=True, flush_log=str(image))]
    with pytest.raises(UserError, match="that is the pmem image itself"):
        Machine(MachineConfig(kernel=tmp_path / "never-booted", pmem=same))
    assert image.read_bytes() == before  # never truncated


# -- the benchmark's sections -------------------------------------------------------------------
def test_bench_lose_unflushed_sections(tmp_path: Path) -> None:
    from test_bench_parse import PMEM_CONSOLE, bench, machine_stats, pmem_device

    assert bench.setup_pmem_lose(tmp_path) == ["--pmem", f"{tmp_path / 'pmem.img'},lose-unflushed=on"]
    args = bench.setup_pmem_lose_log(tmp_path)
    assert args == ["--pmem", f"{tmp_path / 'pmem.img'},lose-unflushed=on,flush-log={tmp_path / bench.FLUSH_LOG_NAME}"]
    for name in ("pmem-lose", "pmem-lose-log"):
        assert bench.SECTIONS[name].steps == bench.SECTIONS["pmem"].steps
    writer = FlushLogWriter(str(tmp_path / bench.FLUSH_LOG_NAME), PAGE_SIZE, 8 * PAGE_SIZE)
    for epoch, n in ((1, 2), (2, 5), (3, 2)):
        writer.append(epoch, [i * PAGE_SIZE for i in range(n)], [page(epoch)] * n)
    writer.close()
    stats = machine_stats({"io": 1}, {"serial": 1}, pmem=[pmem_device("pmem0", str(tmp_path / "pmem.img"), 3, 3, 0.002, 0.004, 0.001)])
    f = bench.parse_pmem_lose_log_section(PMEM_CONSOLE, stats)
    assert (f["pages_per_flush_mean"], f["pages_per_flush_max"], f["log_flushes"]) == (3, 5, 3)
    assert f["flush_n"] == 200 and f["pmem_host_fsyncs"] == 3
    (tmp_path / bench.FLUSH_LOG_NAME).write_bytes((tmp_path / bench.FLUSH_LOG_NAME).read_bytes()[:-1])
    with pytest.raises(bench.BootFailed, match="truncated"):
        bench.parse_pmem_lose_log_section(PMEM_CONSOLE, stats)


def test_a_hostile_page_count_is_a_truncated_record_not_a_huge_read(tmp_path: Path) -> None:
    log, image = tmp_path / "log", tmp_path / "image"
    write_log(log)
    data = bytearray(log.read_bytes())
    struct.pack_into("<I", data, flushlog_header.size + 4, 0x7FFFFFFF)  # record 1's page count
    log.write_bytes(bytes(data))
    image.write_bytes(page(0xEE) * 8)
    warnings: list[str] = []
    assert list_epochs(str(log), warnings.append) == []
    assert len(warnings) == 1 and "truncated record" in warnings[0] and "up to epoch 0" in warnings[0]
