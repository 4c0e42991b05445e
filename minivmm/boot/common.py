"""What the two loader steps share: their typed results, reading files, the command line,
placing the initrd.

Loading a kernel takes two steps, as rust-vmm's linux-loader does: LOAD the image into guest
memory (`KernelLoaderResult`), then CONFIGURE its boot protocol: command line, initrd, the
boot information structure and the entry state (`BootConfig`).
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import layout
from ..errors import GuestMemoryError, UserError
from ..memory import GuestMemory
from ..ranges import AddressRange
from .entry import BootEntry

if TYPE_CHECKING:
    from .bzimage import SetupHeader

# x86 COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h) is 2048 including the NUL.
COMMAND_LINE_SIZE = 2048


class BootProtocol(enum.Enum):
    """How the kernel is entered and told about the machine."""

    PVH = "pvh"  # Xen docs/misc/pvh.pandoc: hvm_start_info (start_info.h), 32-bit entry
    LINUX = "linux"  # Documentation/arch/x86/boot.rst: boot_params, 64-bit entry; a vmlinux (header by minivmm)
    BZIMAGE = "bzimage"  # the same protocol for a bzImage (the file's own setup header)


@dataclass(frozen=True)
class KernelLoaderResult:
    """Step 1, LOAD: where the image went and how to enter it (linux-loader's
    `KernelLoaderResult`)."""

    kernel: AddressRange
    """The bytes written: an ELF's PT_LOAD span (bss included), a bzImage's protected-mode part."""
    kernel_end: int
    """First address past all the kernel claims (a bzImage decompresses into init_size bytes
    from its runtime start); the initrd goes above it."""
    entry: int
    """Where the boot vCPU starts: an ELF's PVH entry (XEN_ELFNOTE_PHYS32_ENTRY) or its
    startup_64 (e_entry), a bzImage's startup_64 (load address + 0x200)."""
    setup_header: SetupHeader | None = None
    """Linux boot protocol only: the parsed (bzImage) or synthesized (vmlinux) setup header
    (boot.rst, "The Real-Mode Kernel Header")."""
    setup_header_bytes: bytes = b""
    """Linux boot protocol only: the header bytes boot_params gets a copy of."""
    protocol: BootProtocol = None  # type: ignore[assignment]  # set in __post_init__ when not given
    """How step 2 enters the kernel; when not given: BZIMAGE with a setup header, else PVH."""
    smp: bool | None = None
    """Whether the image was built with CONFIG_SMP (`kernel_is_smp`, set by `load_image`);
    None when unknown."""

    def __post_init__(self) -> None:
        if self.protocol is None:
            derived = BootProtocol.PVH if self.setup_header is None else BootProtocol.BZIMAGE
            object.__setattr__(self, "protocol", derived)


@dataclass(frozen=True)
class BootConfig:
    """Step 2, CONFIGURE: where the boot protocol's pieces went, and the entry state."""

    protocol: BootProtocol
    cmdline: AddressRange  # including the terminating NUL
    initrd: AddressRange | None
    boot_info: int  # hvm_start_info (PVH) or boot_params (zero page) address
    rsdp_addr: int
    entry: BootEntry
    setup_data: int = 0  # first setup_data entry (Linux boot protocol), 0 for none


def read_file(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UserError(f"{what} {os.fspath(path)}: {exc.strerror or exc}") from None


# UTS_VERSION as both images carry it uncompressed: in a vmlinux's linux_banner ("Linux version
# 6.1.192 (user@host) (gcc ...) #3 SMP 1970-01-01") and in a bzImage's setup code, where the
# header's kernel_version points (boot.rst). "#N" then "SMP" exactly when CONFIG_SMP=y
# (scripts/mkcompile_h).
_UTS_VERSION = re.compile(rb"\) (#\d+(?: [A-Z_]+)*) ")


def kernel_is_smp(data: bytes) -> bool | None:
    """Whether the kernel image `data` (vmlinux or bzImage) was built with CONFIG_SMP, read from
    the first "#N SMP ..." version string in it; None when it has no such string."""
    match = _UTS_VERSION.search(data)
    return None if match is None else b" SMP" in match.group(1)


def encode_cmdline(cmdline: str | bytes) -> bytes:
    data = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in data:
        raise UserError("kernel command line contains a NUL byte")
    return data


def write_cmdline(mem: GuestMemory, cmdline: bytes, max_len: int) -> AddressRange:
    """Write the NUL-terminated command line at `layout.CMDLINE`; `max_len` excludes the NUL."""
    max_len = min(max_len, layout.CMDLINE.size - 1)
    if len(cmdline) > max_len:
        raise UserError(f"kernel command line is too long: {len(cmdline)} bytes, the kernel accepts at most {max_len}")
    data = cmdline + b"\0"
    mem.write(layout.CMDLINE.base, data)
    return AddressRange(layout.CMDLINE.base, len(data))


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


def load_initrd(mem: GuestMemory, path: str | os.PathLike[str], lowest: int, top: int) -> AddressRange:
    """Read the initrd file and write it as high as `place_initrd` allows."""
    blob = read_file(path, "initrd")
    gpa = place_initrd(path, len(blob), layout.align_up(lowest, layout.PAGE_SIZE), top)
    mem.write(gpa, blob)
    return AddressRange(gpa, len(blob))


def check_ram(mem: GuestMemory, gpa: int, size: int, what: str) -> None:
    """UserError unless [gpa, gpa+size) lies inside one guest RAM region."""
    try:
        mem.find(gpa, max(size, 1))
    except GuestMemoryError:
        raise UserError(f"{what} at {gpa:#x}-{gpa + size:#x} does not fit in guest RAM; give the guest more memory") from None
