"""A single-byte I/O register as a bus device: the adapter behind one port of a device
that owns several (the i8042's data and command ports, the ACPI sleep registers)."""

from __future__ import annotations

from typing import Callable


class ByteRegister:
    """Forwards 1-byte accesses at offset 0 to `read()`/`write(value)`; other bytes read `fill`."""

    def __init__(self, read: Callable[[], int], write: Callable[[int], None], fill: int = 0) -> None:
        self._read = read
        self._write = write
        self._fill = fill

    def read(self, offset: int, size: int) -> int:
        return self._read() if offset == 0 else self._fill

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self._write(value & 0xFF)
