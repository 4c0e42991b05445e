"""A hostile guest against the PCI side (issue 9 item 8), property-based with hypothesis.

The guest's only ways in are the real buses: configuration mechanism #1 on the PIO bus (any
port of 0xCF8-0xCFF, any size, any value) and the MMIO bus (BAR 0 of a virtio function: the
common configuration with queue setup and DRIVER_OK on hostile ring addresses, ISR, device
configuration, notify writes to unconfigured queues, the MSI-X table and PBA; and anywhere in
the windows). BARs are sized and moved onto RAM, onto the pmem regions, onto the other
function's BAR and out of the windows, and the command register is toggled at will.

The board: a `PciHostBridge` with two `VirtioPciDevice(VirtioPmem)` on real backing files,
guest RAM and both pmem files as `GuestMemory` regions, a fake interrupt controller (no KVM
here: nothing is claimed about KVM). Function A (slot 1) is the target; function B (slot 2) is
brought up by a well-behaved driver first, its rings in RAM the fuzz does not aim at.

After every case: nothing raised, no device thread hit an unexpected exception, B still
serves (a flush through its notify address completes with ret 0), no BAR is mapped over RAM,
pmem, another BAR or outside the windows, every guest-memory access made lay inside a region,
and the canary bytes behind RAM are untouched. 3 x 3,400 = 10,200 cases.
"""

from __future__ import annotations

import mmap
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivmm import layout
from minivmm.allocator import AddressAllocator
from minivmm.bus import Bus
from minivmm.devices.virtio.common_config import VIRTIO_CONFIG_S_DRIVER_OK
from minivmm.devices.virtio.pci import (
    COMMON_CFG_OFFSET,
    DEVICE_CFG_OFFSET,
    ISR_CFG_OFFSET,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    NOTIFY_CFG_OFFSET,
    VIRTIO_BAR_SIZE,
    VirtioPciDevice,
)
from minivmm.devices.virtio.pmem import VIRTIO_PMEM_REQ_TYPE_FLUSH, VirtioPmem
from minivmm.devices.virtio.queue import VIRTQ_DESC_F_WRITE, virtq_desc
from minivmm.memory import GuestMemory, Region
from support.fakes import FakeInterruptController, FakeIoEventRegistry, GuestConf1
from minivmm.pci.host import PciHostBridge
from minivmm.pmemfile import PmemBacking, PmemSpec, open_backing
from minivmm.ranges import AddressRange

MiB = 1 << 20
RAM = AddressRange(0, 1 * MiB)
B_RINGS = AddressRange(0x7_F000_0000, 0x10000)  # B's rings and requests: a region of its own
PMEM_A = AddressRange(0x1_0000_0000, 2 * MiB)
PMEM_B = AddressRange(0x1_0020_0000, 2 * MiB)
W32 = AddressRange(0xC000_0000, 0x3EC0_0000)
W64 = AddressRange(0x2_0000_0000, 0x1_0000_0000)
CANARY = b"\xa5" * 4096
SLOT_A, SLOT_B = 1, 2
TIMEOUT = 10.0
CASES = 3400
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    derandomize=True,  # the same 10,200 cases on every run: a failure is reproducible
    database=None,  # and no replay of cases saved by an older version of this file
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


class CheckedMemory(GuestMemory):
    """Guest memory that records every access it let through, to check each lies in a region."""

    def __init__(self) -> None:
        super().__init__()
        self.outside: list[tuple[int, int]] = []

    def find(self, gpa: int, length: int = 1) -> Region:
        r = super().find(gpa, length)
        if not (r.gpa <= gpa and gpa + length <= r.end and r in self.regions):
            self.outside.append((gpa, length))
        return r


class Board:
    """Bridge + B (brought up once, serving throughout) + a fresh A for each case."""

    def __init__(self, backings: tuple[PmemBacking, PmemBacking], ram: mmap.mmap, rings: mmap.mmap) -> None:
        self.mmio, self.pio = Bus("mmio"), Bus("pio")
        self.ic = FakeInterruptController()
        self.bridge = PciHostBridge(
            self.mmio, FakeIoEventRegistry(), AddressAllocator("w32", W32), AddressAllocator("w64", W64), intx=self.ic
        )
        self.pio.register(layout.PCI_CONFIG_ADDRESS_PORT, layout.PCI_CONFIG_PORT_COUNT, self.bridge.conf1, "pci-conf1")
        self.g = GuestConf1(self.pio)
        self.ram = ram
        self.mem = CheckedMemory()
        self.mem.add_region(Region(RAM.base, RAM.size, ram, "ram"))
        self.mem.add_region(Region(B_RINGS.base, B_RINGS.size, rings, "ram-b"))
        self.mem.add_region(Region(PMEM_A.base, PMEM_A.size, backings[0].mapping, "pmem-a"))
        self.mem.add_region(Region(PMEM_B.base, PMEM_B.size, backings[1].mapping, "pmem-b"))
        self.backings = backings
        self.pmem = {SLOT_B: VirtioPmem.from_backing(backings[1], PMEM_B.base)}
        self.t = {SLOT_B: VirtioPciDevice(self.pmem[SLOT_B], self.mem, self.ic, name="b")}
        assert self.bridge.add_device(self.t[SLOT_B], SLOT_B) == SLOT_B
        self.b_bar = self.t[SLOT_B].config.bar_address(0)
        self.b_flushes = 0
        self._bring_up_b()

    def fresh_a(self) -> None:
        """Unplug the previous case's A (stopping its flusher) and plug in a new one."""
        if SLOT_A in self.t:
            self.bridge.remove_device(SLOT_A)
            self.t.pop(SLOT_A).close()
            assert self.pmem.pop(SLOT_A).errors == []
        self.ram[: RAM.size] = bytes(RAM.size)  # each case starts from zeroed RAM
        self.pmem[SLOT_A] = VirtioPmem.from_backing(self.backings[0], PMEM_A.base)
        self.t[SLOT_A] = VirtioPciDevice(self.pmem[SLOT_A], self.mem, self.ic, name="a")
        assert self.bridge.add_device(self.t[SLOT_A], SLOT_A) == SLOT_A

    # -- the well-behaved driver of B (virtio_pci_modern + nd_virtio, 16-entry queue) ----------

    def _common(self, off: int, size: int, value: int) -> None:
        self.mmio.write(self.b_bar + COMMON_CFG_OFFSET + off, size, value)

    def _bring_up_b(self) -> None:
        g, msix = self.g, self.t[SLOT_B].msix
        g.write(SLOT_B, 4, 2, 0x6)  # memory + bus master
        g.write(SLOT_B, msix.cap_offset + 2, 2, 0x8000)  # MSI-X enable
        for i in range(msix.nvectors):
            base = self.b_bar + MSIX_TABLE_OFFSET + 16 * i
            self.mmio.write(base, 4, 0xFEE0_0000)
            self.mmio.write(base + 8, 4, 0x40 + i)
            self.mmio.write(base + 12, 4, 0)
        w = self._common
        w(0x14, 1, 0)
        w(0x14, 1, 1 | 2)
        w(0x08, 4, 1)
        w(0x0C, 4, 1)  # VIRTIO_F_VERSION_1
        w(0x14, 1, 1 | 2 | 8)
        w(0x10, 2, 0)
        w(0x16, 2, 0)
        w(0x18, 2, 16)
        w(0x1A, 2, 1)
        for off, addr in ((0x20, B_RINGS.base), (0x28, B_RINGS.base + 0x100), (0x30, B_RINGS.base + 0x200)):
            w(off, 4, addr & 0xFFFF_FFFF)
            w(off + 4, 4, addr >> 32)
        w(0x1C, 2, 1)
        w(0x14, 1, 1 | 2 | 8 | VIRTIO_CONFIG_S_DRIVER_OK)
        assert self.pmem[SLOT_B].active

    def flush_b(self) -> int:
        """One FLUSH on B through its notify address; waits for the used ring; returns ret."""
        mem, n = self.mem, self.b_flushes % 256
        desc, avail, used, req = B_RINGS.base, B_RINGS.base + 0x100, B_RINGS.base + 0x200, B_RINGS.base + 0x1000
        head = (2 * self.b_flushes) % 16
        mem.write_int(req + 16 * n, 4, VIRTIO_PMEM_REQ_TYPE_FLUSH)
        mem.write_int(req + 16 * n + 8, 4, 0xDEAD)
        mem.write_struct(desc + 16 * head, virtq_desc, req + 16 * n, 4, 1, head + 1)  # NEXT
        mem.write_struct(desc + 16 * (head + 1), virtq_desc, req + 16 * n + 8, 4, VIRTQ_DESC_F_WRITE, 0)
        mem.write_int(avail + 4 + 2 * (self.b_flushes % 16), 2, head)
        idx = (self.b_flushes + 1) & 0xFFFF
        mem.write_int(avail + 2, 2, idx)
        self.mmio.write(self.b_bar + NOTIFY_CFG_OFFSET, 2, 0)  # no KVM: the notify reaches Python
        deadline = time.monotonic() + TIMEOUT
        while mem.read_int(used + 2, 2) != idx:
            assert time.monotonic() < deadline, "B stopped serving"
            time.sleep(0.0002)
        self.b_flushes += 1
        return mem.read_int(req + 16 * n + 8, 4)

    # -- the hostile guest's MMIO --------------------------------------------------------------

    def guest_mmio(self, addr: int, size: int, value: int | None) -> None:
        """An access by the hostile guest; one landing on B's BAR is dropped (writing B's own
        registers would only show that B obeys its driver - e.g. after A's BAR was moved onto
        B's, "A's" registers are B's)."""
        if addr < self.b_bar + VIRTIO_BAR_SIZE and self.b_bar < addr + size:
            return
        if value is None:
            self.mmio.read(addr, size)
        else:
            self.mmio.write(addr, size, value & ((1 << 8 * size) - 1))

    # -- invariants ----------------------------------------------------------------------------

    def check(self) -> None:
        assert self.flush_b() == 0
        assert self.pmem[SLOT_A].errors == [] and self.pmem[SLOT_B].errors == []
        taken = [AddressRange(r.gpa, r.size) for r in self.mem.regions]
        mapped = []
        for (slot, index), addr in self.bridge.mapped_bars.items():
            if slot == 0:
                continue
            rng = AddressRange(addr, self.t[slot].config.bars[index].size)
            assert any(w.covers(rng.base, rng.size) for w in (W32, W64)), f"BAR mapped outside the windows: {rng}"
            assert not any(rng.base < t.end and t.base < rng.end for t in taken + mapped), f"BAR over memory: {rng}"
            mapped.append(rng)
        assert self.bridge.mapped_bars[(SLOT_B, 0)] == self.b_bar  # B never lost its BAR
        assert self.mem.outside == []

    def close(self) -> None:
        for t in self.t.values():
            t.close()
        for route in self.ic.routes:
            route.close()


@pytest.fixture(scope="module")
def backings(tmp_path_factory):
    """The two backing files, on tmpfs when there is one: B's flush runs a real fdatasync every
    case, and on a disk each would cost a device cache flush (5 ms here), 10,200 times."""
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else tmp_path_factory.mktemp("pcifuzz")) as d:
        pair = tuple(open_backing(PmemSpec(str(Path(d) / f"{n}.img"), size=2 * MiB)) for n in "ab")
        yield pair
        for b in pair:
            b.close()


@pytest.fixture
def board(backings):
    """One board per test function: hypothesis runs every case of the test on it."""
    ram = mmap.mmap(-1, RAM.size + len(CANARY))
    ram[RAM.size :] = CANARY
    rings = mmap.mmap(-1, B_RINGS.size)
    b = Board(backings, ram, rings)
    yield b
    b.close()
    assert ram[RAM.size :] == CANARY, "a write landed behind guest RAM"


# ------------------------------------------------------------------ what a hostile guest does

sizes = st.sampled_from([1, 2, 4])
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)
# Addresses worth aiming at: RAM, both pmem files, B's BAR, the windows' edges, just outside.
targets = st.sampled_from(
    [RAM.base, RAM.base + 0x1000, RAM.end - 0x8000, PMEM_A.base, PMEM_B.base, PMEM_B.end - 0x8000,
     W32.base, W32.end - VIRTIO_BAR_SIZE, W32.end, W64.base, W64.end - VIRTIO_BAR_SIZE, W64.end,
     0xFEE0_0000, 0xFFFF_FFFF_FFFF_8000, (1 << 52) - VIRTIO_BAR_SIZE]
) | u64.map(lambda a: a & ~(VIRTIO_BAR_SIZE - 1))  # fmt: skip
bar0_offsets = st.sampled_from(
    [COMMON_CFG_OFFSET, ISR_CFG_OFFSET, DEVICE_CFG_OFFSET, NOTIFY_CFG_OFFSET, MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET]
).flatmap(lambda base: st.integers(0, 0x40).map(lambda d: base + d)) | st.integers(-8, VIRTIO_BAR_SIZE + 8)
ring_addrs = targets | st.sampled_from([RAM.base + 0x4000, RAM.base + 0x4001, PMEM_A.base + 0x1000, RAM.end - 2])

# Operations, each a tuple the interpreter below executes.
# B is the bystander: config accesses go to the host bridge, A and empty slots, never to B.
conf1_op = st.tuples(st.just("cfg"), st.sampled_from([0, SLOT_A, 7, 31]), st.integers(0, 255), sizes, u32, st.booleans())
conf1_raw = st.tuples(st.just("pio"), st.integers(0xCF8, 0xCFF), sizes, u32, st.booleans())
bar_move = st.tuples(st.just("bar"), st.sampled_from([SLOT_A, 0]), st.integers(0, 5), targets, st.booleans())
command = st.tuples(st.just("cmd"), st.sampled_from([SLOT_A, 0]), st.integers(0, 0xFFFF))
size_bar = st.tuples(st.just("size"), st.integers(0, 5))
mmio_a = st.tuples(st.just("bar0"), bar0_offsets, st.sampled_from([1, 2, 4, 8]), u64, st.booleans())
mmio_any = st.tuples(st.just("mmio"), targets | st.integers(0, (1 << 64) - 8), st.sampled_from([1, 2, 4, 8]), u64, st.booleans())
msix = st.tuples(st.just("msix"), st.integers(0, 3), st.integers(0, 3), u32)
bring_up = st.tuples(
    st.just("up"), st.sampled_from([1, 2, 4, 16, 3, 0, 512]), ring_addrs, ring_addrs, ring_addrs,
    st.integers(0, 3) | st.just(0xFFFF), st.booleans(),
)  # fmt: skip
notify = st.tuples(st.just("notify"), st.integers(0, 8), sizes)


def run_ops(b: Board, ops: list[tuple]) -> None:
    b.fresh_a()
    ta = b.t[SLOT_A]
    for op in ops:
        kind, *args = op
        if kind == "cfg":
            slot, reg, size, value, write = args
            reg &= ~(size - 1)  # conf1 data ports only carry naturally aligned accesses
            if write:
                b.g.write(slot, reg, size, value & ((1 << 8 * size) - 1))
            else:
                b.g.read(slot, reg, size)
        elif kind == "pio":
            port, size, value, write = args
            if port == 0xCF8 and size == 4 and value >> 11 & 0x1F == SLOT_B:
                value ^= (SLOT_A ^ SLOT_B) << 11  # a CONFIG_ADDRESS naming B names A instead
            if write:
                b.pio.write(port, size, value & ((1 << 8 * size) - 1))
            else:
                b.pio.read(port, size)
        elif kind == "bar":
            slot, index, addr, upper_first = args
            reg = 0x10 + 4 * index
            halves = [(reg, addr & 0xFFFF_FFFF), (reg + 4, addr >> 32 & 0xFFFF_FFFF)]
            for r, v in reversed(halves) if upper_first else halves:
                if r < 0x28:
                    b.g.write(slot, r, 4, v)
        elif kind == "cmd":
            slot, value = args
            b.g.write(slot, 4, 2, value)
        elif kind == "size":
            b.g.size_bar(SLOT_A, args[0])
        elif kind == "bar0":
            offset, size, value, write = args
            b.guest_mmio(ta.config.bar_address(0) + offset, size, value if write else None)
        elif kind == "mmio":
            addr, size, value, write = args
            b.guest_mmio(addr, size, value if write else None)
        elif kind == "msix":
            entry, word, value = args
            b.guest_mmio(ta.config.bar_address(0) + MSIX_TABLE_OFFSET + 16 * entry + 4 * word, 4, value)
        elif kind == "up":
            qsize, desc, avail, used, vector, kick = args
            bar = ta.config.bar_address(0)
            w = lambda off, size, v: b.guest_mmio(bar + COMMON_CFG_OFFSET + off, size, v)  # noqa: E731
            w(0x14, 1, 0)
            w(0x14, 1, 3)
            w(0x08, 4, 1)
            w(0x0C, 4, 1)
            w(0x14, 1, 11)
            w(0x16, 2, 0)
            w(0x18, 2, qsize)
            w(0x1A, 2, vector)
            for off, a in ((0x20, desc), (0x28, avail), (0x30, used)):
                w(off, 4, a & 0xFFFF_FFFF)
                w(off + 4, 4, a >> 32 & 0xFFFF_FFFF)
            w(0x1C, 2, 1)
            w(0x14, 1, 15)
            if kick:
                b.guest_mmio(bar + NOTIFY_CFG_OFFSET, 2, 0)
        elif kind == "notify":
            queue, size = args
            b.guest_mmio(ta.config.bar_address(0) + NOTIFY_CFG_OFFSET + 4 * queue, size, queue)
        else:  # pragma: no cover
            raise AssertionError(kind)


@FUZZ
@given(ops=st.lists(conf1_op | conf1_raw | bar_move | command | size_bar, min_size=1, max_size=12))
def test_fuzz_config_space_bars_and_command(board, ops) -> None:
    run_ops(board, ops)
    board.check()


@FUZZ
@given(ops=st.lists(mmio_a | msix | notify | bring_up | command, min_size=1, max_size=12))
def test_fuzz_bar0_registers_msix_and_notify(board, ops) -> None:
    run_ops(board, ops)
    board.check()


@FUZZ
@given(ops=st.lists(conf1_op | bar_move | command | mmio_a | mmio_any | msix | notify | bring_up | size_bar, min_size=1, max_size=16))
def test_fuzz_everything_interleaved(board, ops) -> None:
    run_ops(board, ops)
    board.check()
