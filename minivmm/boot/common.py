"""Helpers shared by the loaders: reading files, the command line, placing the initrd."""

from __future__ import annotations

import os

from .. import layout
from ..errors import GuestMemoryError, UserError
from ..memory import GuestMemory
from .cpu import LoadedRange

# x86 COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h) is 2048 including the NUL.
COMMAND_LINE_SIZE = 2048


def read_file(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UserError(f"{what} {os.fspath(path)}: {exc.strerror or exc}") from None


def encode_cmdline(cmdline: str | bytes) -> bytes:
    data = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in data:
        raise UserError("kernel command line contains a NUL byte")
    return data


def write_cmdline(mem: GuestMemory, cmdline: bytes, max_len: int) -> LoadedRange:
    """Write the NUL-terminated command line at `layout.CMDLINE`; `max_len` excludes the NUL."""
    max_len = min(max_len, layout.CMDLINE.size - 1)
    if len(cmdline) > max_len:
        raise UserError(f"kernel command line is too long: {len(cmdline)} bytes, the kernel accepts at most {max_len}")
    data = cmdline + b"\0"
    mem.write(layout.CMDLINE.base, data)
    return LoadedRange(layout.CMDLINE.base, len(data))


def place_initrd(path: str | os.PathLike[str], size: int, lowest: int, top: int) -> int:
    """Page-aligned address for an initrd of `size` bytes ending at or below `top`, as high as
    possible, but not below `lowest` (the end of what the kernel occupies)."""
    gpa = layout.align_down(top - size, layout.PAGE_SIZE)
    if size > top or gpa < lowest:
        raise UserError(
            f"initrd {os.fspath(path)}: {size} bytes do not fit in guest RAM between the kernel "
            f"(ends at {lowest:#x}) and {top:#x}; give the guest more memory"
        )
    return gpa


def check_ram(mem: GuestMemory, gpa: int, size: int, what: str) -> None:
    """UserError unless [gpa, gpa+size) lies inside one guest RAM region."""
    try:
        mem.find(gpa, max(size, 1))
    except GuestMemoryError:
        raise UserError(f"{what} at {gpa:#x}-{gpa + size:#x} does not fit in guest RAM; give the guest more memory") from None
