"""A register block declared as a table: (offset, size, name, writable) per register.

The owner implements ``_get_<name>() -> int`` for every register and ``_set_<name>(value)``
for every writable one. Accesses of any size at any offset are split over the registers they
touch; a partial write to a register is a read-modify-write of that register, and bytes
outside every register read 0 and ignore writes. Writes to read-only registers are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Register:
    offset: int
    size: int
    name: str
    writable: bool = True


class RegisterBlock:
    def __init__(self, registers: Sequence[Register], owner: object) -> None:
        self.registers = tuple(sorted(registers, key=lambda r: r.offset))
        self.size = max(r.offset + r.size for r in self.registers)
        self._get: dict[str, Callable[[], int]] = {r.name: getattr(owner, f"_get_{r.name}") for r in self.registers}
        self._set: dict[str, Callable[[int], None]] = {
            r.name: getattr(owner, f"_set_{r.name}") for r in self.registers if r.writable
        }

    def register(self, name: str) -> Register:
        return next(r for r in self.registers if r.name == name)

    def _touched(self, offset: int, size: int) -> list[Register]:
        return [r for r in self.registers if offset < r.offset + r.size and r.offset < offset + size]

    def read(self, offset: int, size: int) -> int:
        value = 0
        for r in self._touched(offset, size):
            reg_value = self._get[r.name]() & ((1 << (8 * r.size)) - 1)
            for k in range(max(offset, r.offset), min(offset + size, r.offset + r.size)):
                value |= ((reg_value >> (8 * (k - r.offset))) & 0xFF) << (8 * (k - offset))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for r in self._touched(offset, size):
            setter = self._set.get(r.name)
            if setter is None:
                continue
            lo, hi = max(offset, r.offset), min(offset + size, r.offset + r.size)
            if lo == r.offset and hi == r.offset + r.size:
                reg_value = 0
            else:
                reg_value = self._get[r.name]()
            for k in range(lo, hi):
                shift = 8 * (k - r.offset)
                byte = (value >> (8 * (k - offset))) & 0xFF
                reg_value = reg_value & ~(0xFF << shift) | byte << shift
            setter(reg_value)
