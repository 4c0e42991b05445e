"""Kernel loading: detect the format, load it and describe the initial vCPU state.

An ELF file (`\\x7fELF`) is booted through PVH (`pvh.py`); anything with the "HdrS" setup
header through the x86 Linux boot protocol's 64-bit entry (`bzimage.py`). Both return a
`BootEntry` that the machine copies into the boot vCPU's registers.
"""

from __future__ import annotations

import os

from .. import layout
from ..errors import UserError
from ..memory import GuestMemory
from .acpi import build_acpi, write_acpi_tables
from .bzimage import is_bzimage, load_bzimage
from .common import encode_cmdline, read_file
from .cpu import BootEntry, LoadedRange, Segment
from .pvh import is_elf, load_pvh

__all__ = ["BootEntry", "LoadedRange", "Segment", "build_acpi", "load_kernel", "write_acpi_tables"]


def load_kernel(
    mem: GuestMemory,
    kernel_path: str | os.PathLike[str],
    initrd_path: str | os.PathLike[str] | None,
    cmdline: str | bytes,
    mem_size: int,
    rsdp_addr: int,
) -> BootEntry:
    """Load `kernel_path` (an ELF vmlinux with a PVH note, or a bzImage) and, if given, the
    initrd into `mem` (guest RAM laid out by `layout.ram_ranges(mem_size)`), write the
    command line and boot information, and return the entry state.

    Every problem with the files or sizes is a `UserError` naming the file."""
    layout.check_mem_size(mem_size)
    data = read_file(kernel_path, "kernel")
    cmd = encode_cmdline(cmdline)
    if is_elf(data):
        return load_pvh(mem, kernel_path, data, initrd_path, cmd, mem_size, rsdp_addr)
    if is_bzimage(data):
        return load_bzimage(mem, kernel_path, data, initrd_path, cmd, mem_size, rsdp_addr)
    raise UserError(f"kernel {os.fspath(kernel_path)}: not an ELF vmlinux or a bzImage (unknown format)")
