"""RegisterBlock: access splitting at every size and offset, read-only registers, partial
writes (read-modify-write), holes, against a byte-array model of the registers."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivmm.register_block import ReadToClearBits, Register, RegisterBlock

# (offset, size, writable): a hole at 3, registers of every width, a read-only one, a hole
# at 0x14-0x17 between two registers, and nothing past 0x20.
LAYOUT = ((0, 1, True), (1, 2, True), (4, 4, False), (8, 8, True), (0x10, 4, True), (0x18, 8, True))
SIZE = 0x20


class Model:
    """Registers backed by a byte array; every accessor call is logged."""

    def __init__(self, fill: int = 0) -> None:
        self.mem = bytearray(range(0x80, 0x80 + SIZE))
        self.calls: list[tuple[str, str, int]] = []
        regs = [
            Register(off, size, f"r{off:x}", self._reader(off, size), self._writer(off, size) if writable else None)
            for off, size, writable in LAYOUT
        ]
        self.block = RegisterBlock(regs, fill=fill)
        self.fill = fill

    def _reader(self, off: int, size: int):
        def read() -> int:
            self.calls.append(("read", f"r{off:x}", 0))
            return int.from_bytes(self.mem[off : off + size], "little")

        return read

    def _writer(self, off: int, size: int):
        def write(value: int) -> None:
            assert 0 <= value < 1 << (8 * size)
            self.calls.append(("write", f"r{off:x}", value))
            self.mem[off : off + size] = value.to_bytes(size, "little")

        return write

    def owner(self, addr: int) -> tuple[int, int, bool] | None:
        return next((r for r in LAYOUT if r[0] <= addr < r[0] + r[1]), None)

    def expected_read(self, offset: int, size: int) -> int:
        return int.from_bytes(
            bytes(self.mem[a] if a < SIZE and self.owner(a) else self.fill for a in range(offset, offset + size)),
            "little",
        )


accesses = st.tuples(st.integers(0, SIZE + 8), st.sampled_from((1, 2, 4, 8)))


@pytest.mark.parametrize("fill", [0, 0xFF])
@given(access=accesses)
def test_read_any_size_any_offset(fill: int, access: tuple[int, int]) -> None:
    m = Model(fill)
    offset, size = access
    assert m.block.read(offset, size) == m.expected_read(offset, size)
    touched = {f"r{o:x}" for o, s, _ in LAYOUT if offset < o + s and o < offset + size}
    assert [c[1] for c in m.calls] == sorted(touched, key=lambda n: int(n[1:], 16))  # each once, in order
    assert all(c[0] == "read" for c in m.calls)


@given(access=accesses, value=st.integers(0, (1 << 64) - 1))
def test_write_any_size_any_offset(access: tuple[int, int], value: int) -> None:
    m = Model()
    offset, size = access
    value &= (1 << (8 * size)) - 1
    before = bytes(m.mem)
    m.block.write(offset, size, value)
    for addr in range(SIZE):
        reg = m.owner(addr)
        inside = offset <= addr < offset + size
        if inside and reg is not None and reg[2]:
            assert m.mem[addr] == (value >> (8 * (addr - offset))) & 0xFF, hex(addr)
        else:
            assert m.mem[addr] == before[addr], hex(addr)  # holes, read-only and untouched bytes
    for off, rsize, writable in LAYOUT:
        if not (offset < off + rsize and off < offset + size):
            continue
        name = f"r{off:x}"
        mine = [c[:2] for c in m.calls if c[1] == name]
        whole = offset <= off and off + rsize <= offset + size
        if not writable:
            assert ("write", name) not in mine
        elif whole:
            assert mine == [("write", name)]  # no read for a whole-register write
        else:
            assert mine == [("read", name), ("write", name)]  # read-modify-write


def test_exact_access_goes_straight_to_the_register() -> None:
    m = Model()
    assert m.block.read(8, 8) == int.from_bytes(m.mem[8:16], "little")
    m.block.write(0x10, 4, 0x1234_5678)
    assert m.calls == [("read", "r8", 0), ("write", "r10", 0x1234_5678)]


def test_write_is_masked_to_the_register() -> None:
    m = Model()
    m.block.write(0, 1, 0x1FF)  # a caller that did not mask: the register sees one byte
    assert m.calls == [("write", "r0", 0xFF)]


def test_read_only_register_drops_writes() -> None:
    m = Model()
    before = m.block.read(4, 4)
    m.block.write(4, 4, 0)
    m.block.write(5, 2, 0)
    assert m.block.read(4, 4) == before
    assert not any(c[0] == "write" for c in m.calls)


def test_partial_write_keeps_the_other_bytes() -> None:
    m = Model()
    m.block.write(8, 8, 0x1122_3344_5566_7788)
    m.block.write(12, 4, 0xAABB_CCDD)  # the high half, as vp_iowrite64_twopart writes it
    assert m.block.read(8, 8) == 0xAABB_CCDD_5566_7788
    m.block.write(9, 2, 0xEEFF)
    assert m.block.read(8, 8) == 0xAABB_CCDD_55EE_FF88


def test_holes_read_fill_and_ignore_writes() -> None:
    m = Model(fill=0xFF)
    assert m.block.read(3, 1) == 0xFF
    assert m.block.read(0x14, 4) == 0xFFFF_FFFF
    assert m.block.read(SIZE, 8) == (1 << 64) - 1
    assert m.block.read(2, 2) == 0xFF00 | m.mem[2]
    m.block.write(3, 1, 0)
    m.block.write(SIZE + 4, 4, 0)
    assert m.calls == [("read", "r1", 0)]
    assert Model().block.read(0x14, 4) == 0


def test_block_size_and_lookup() -> None:
    m = Model()
    assert m.block.size == SIZE
    assert m.block.register("r18").offset == 0x18
    with pytest.raises(KeyError):
        m.block.register("nope")


def test_overlapping_registers_are_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        RegisterBlock([Register(0, 4, "a", lambda: 0), Register(2, 2, "b", lambda: 0)])
    with pytest.raises(ValueError):
        RegisterBlock([Register(0, 0, "empty", lambda: 0)])
    with pytest.raises(ValueError):
        RegisterBlock([Register(0, 1, "a", lambda: 0)], fill=0x100)


def test_read_to_clear_bits_return_each_set_bit_once_and_track_the_level():
    levels: list[bool] = []
    bits = ReadToClearBits(levels.append)
    bits.set(0b001)
    bits.set(0b100)
    assert bits.peek() == 0b101 and levels == [True, True]
    assert bits.take() == 0b101
    assert bits.take() == 0 and bits.peek() == 0 and levels[-1] is False


def test_read_to_clear_bits_lose_nothing_set_while_another_thread_reads():
    bits = ReadToClearBits()
    seen = 0
    done = threading.Event()

    def setter() -> None:
        for i in range(32):
            bits.set(1 << i)
        done.set()

    t = threading.Thread(target=setter)
    t.start()
    while not done.is_set():
        seen |= bits.take()
    t.join()
    seen |= bits.take()
    assert seen == (1 << 32) - 1
