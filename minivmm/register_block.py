"""Device registers declared as a table: each `Register` names its offset, size and the two
callables that read and write it, and a `RegisterBlock` is a `BusDevice` over such a table.

An access of any size at any offset is split over the registers it touches, in ascending
offset order, as a bus would present the bytes to a device that decodes each register:

* a read of part of a register reads the whole register and returns the bytes asked for;
* a write of part of a register is a read-modify-write of that register (its other bytes
  keep the value the register reads, so a register whose read has side effects should
  only be written whole);
* a register without a `write` callable is read-only: writes to it are dropped;
* bytes outside every register read `fill` (0 unless the block says otherwise) and writes
  to them are dropped.

An access that covers exactly one whole register (the common case: a driver uses natural
widths) goes straight to that register's callable.

Registers whose meaning depends on device state, such as the 16550's divisor latch behind
LCR.DLAB, are one block per bank; a read-only and a write-only register at one offset
(RBR/THR) are one `Register` whose `read` and `write` reach different state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Register:
    """`size` bytes at `offset`; `read()` returns its value, `write(value)` (None: read-only)
    receives a value of `size` bytes."""

    offset: int
    size: int
    name: str
    read: Callable[[], int]
    write: Callable[[int], None] | None = None

    @property
    def end(self) -> int:
        return self.offset + self.size


class ReadToClearBits:
    """A bitmap register's state whose read returns every pending bit and clears them.

    Bits are set from any thread (`set`) and taken by the guest's read (`take`, on a vCPU
    thread); `on_change(pending)` runs under the same lock after each, so a device can keep an
    interrupt line's level equal to "some bit is pending" without a race between the two.
    """

    def __init__(self, on_change: Callable[[bool], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._bits = 0
        self._on_change = on_change

    def set(self, bits: int) -> None:
        with self._lock:
            self._bits |= bits
            if self._on_change is not None:
                self._on_change(True)

    def take(self) -> int:
        """The pending bits, now cleared (the register's read)."""
        with self._lock:
            bits, self._bits = self._bits, 0
            if self._on_change is not None:
                self._on_change(False)
        return bits

    def peek(self) -> int:
        """The pending bits, left pending (statistics and tests)."""
        with self._lock:
            return self._bits


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


class RegisterBlock:
    """A `BusDevice` over non-overlapping registers; its `size` is the end of the last one."""

    def __init__(self, registers: Iterable[Register], *, fill: int = 0) -> None:
        self.registers = tuple(sorted(registers, key=lambda r: r.offset))
        for r in self.registers:
            if r.offset < 0 or r.size <= 0:
                raise ValueError(f"register {r.name}: bad range {r.offset:#x}+{r.size:#x}")
        for a, b in zip(self.registers, self.registers[1:]):
            if b.offset < a.end:
                raise ValueError(f"registers {a.name} and {b.name} overlap")
        if not 0 <= fill <= 0xFF:
            raise ValueError(f"fill {fill:#x} is not a byte")
        self.fill = fill
        self.size = self.registers[-1].end if self.registers else 0
        # The register starting at each offset, for the whole-register fast path.
        self._starting: list[Register | None] = [None] * self.size
        for r in self.registers:
            self._starting[r.offset] = r

    def register(self, name: str) -> Register:
        """The register called `name` (KeyError if there is none)."""
        for r in self.registers:
            if r.name == name:
                return r
        raise KeyError(name)

    def read(self, offset: int, size: int) -> int:
        r = self._starting[offset] if 0 <= offset < self.size else None
        if r is not None and r.size == size:
            return r.read() & _mask(size)
        return self._read_split(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        r = self._starting[offset] if 0 <= offset < self.size else None
        if r is not None and r.size == size:
            if r.write is not None:
                r.write(value & _mask(size))
            return
        self._write_split(offset, size, value)

    def _touched(self, offset: int, size: int) -> list[Register]:
        return [r for r in self.registers if offset < r.end and r.offset < offset + size]

    def _read_split(self, offset: int, size: int) -> int:
        value = 0
        covered = 0  # the bytes of the access that some register answered, as a mask
        for r in self._touched(offset, size):
            lo, hi = max(offset, r.offset), min(offset + size, r.end)
            part = (r.read() & _mask(r.size)) >> (8 * (lo - r.offset)) & _mask(hi - lo)
            value |= part << (8 * (lo - offset))
            covered |= _mask(hi - lo) << (8 * (lo - offset))
        if self.fill:
            value |= (self.fill * (_mask(size) // 0xFF)) & ~covered
        return value

    def _write_split(self, offset: int, size: int, value: int) -> None:
        for r in self._touched(offset, size):
            if r.write is None:
                continue
            lo, hi = max(offset, r.offset), min(offset + size, r.end)
            part_mask = _mask(hi - lo) << (8 * (lo - r.offset))
            part = (value >> (8 * (lo - offset)) << (8 * (lo - r.offset))) & part_mask
            old = 0 if part_mask == _mask(r.size) else r.read() & _mask(r.size)
            r.write(old & ~part_mask | part)

    def describe(self, offset: int, size: int, value: int, is_write: bool) -> str | None:
        """An access in register names, for `--trace`: "queue_select = 0" (a write),
        "LSR -> 0x60" (a read); a part of a register is named with its byte range
        ("queue_desc[4:8]"). None when the access touches no register."""
        touched = self._touched(offset, size)
        if not touched:
            return None
        names = []
        for r in touched:
            lo, hi = max(offset, r.offset) - r.offset, min(offset + size, r.end) - r.offset
            names.append(r.name if (lo, hi) == (0, r.size) else f"{r.name}[{lo}:{hi}]")
        return f"{'/'.join(names)} {'=' if is_write else '->'} {format_value(value)}"


def format_value(value: int) -> str:
    """Small numbers in decimal (a queue index, a status bit count), the rest in hex."""
    return str(value) if value < 10 else f"{value:#x}"
