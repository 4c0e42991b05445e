"""PVH boot of an uncompressed ELF `vmlinux` (Xen's PVH boot ABI, docs/misc/pvh.pandoc).

The kernel advertises its 32-bit entry point in an ELF note of name "Xen" and type
XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h). Step 1, `load_elf`, copies every
PT_LOAD segment to its physical address `p_paddr` (`elf.py`). Step 2, `configure_pvh`, builds
`struct hvm_start_info` version 1 (xen/include/public/arch-x86/hvm/start_info.h) with the
memory map, one module (the initrd) and the command line, and the entry state: 32-bit
protected mode with paging off, flat segments and EBX = the start info address
(pvh.pandoc, "x86/HVM direct boot ABI").
"""

from __future__ import annotations

import os
import struct

from .. import layout
from ..errors import UserError
from ..memory import GuestMemory
from ..ranges import AddressRange
from .common import COMMAND_LINE_SIZE, BootConfig, BootProtocol, KernelLoaderResult, load_initrd, write_cmdline
from .elf import ElfImage, check_entry, iter_notes, load_segments, parse_elf
from .entry import CpuMode, Registers, setup_entry

XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_VERSION = 1

# struct hvm_start_info: magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr,
# rsdp_paddr, memmap_paddr, memmap_entries, reserved.
HVM_START_INFO = struct.Struct("<IIIIQQQQII")
# struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved.
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")
# struct hvm_memmap_table_entry: addr, size, type (XEN_HVM_MEMMAP_TYPE_*, = E820 types), reserved.
HVM_MEMMAP_TABLE_ENTRY = struct.Struct("<QQII")


def _phys32_entry(image: ElfImage) -> int | None:
    for notes in image.notes:
        for name, ntype, desc in iter_notes(notes):
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
                return int.from_bytes(desc, "little")
    return None


def load_elf(mem: GuestMemory, kernel_path: str | os.PathLike[str], data: bytes, mem_size: int) -> KernelLoaderResult:
    """Step 1: copy the PT_LOAD segments of the ELF `data` to their physical addresses in
    guest RAM laid out for `mem_size`, zeroing the bss tails; the entry is the PVH note's."""
    path = os.fspath(kernel_path)
    image = parse_elf(path, data)
    entry = _phys32_entry(image)
    if entry is None:
        raise UserError(
            f"kernel {path}: ELF file has no PVH entry point (no Xen note XEN_ELFNOTE_PHYS32_ENTRY); "
            "build the kernel with CONFIG_PVH=y, or boot it with --boot linux"
        )
    span = load_segments(mem, path, image, data, mem_size)
    check_entry(path, "PVH entry point", entry, span)
    return KernelLoaderResult(kernel=span, kernel_end=span.end, entry=entry)


def configure_pvh(
    mem: GuestMemory,
    loaded: KernelLoaderResult,
    cmdline: bytes,
    initrd_path: str | os.PathLike[str] | None,
    mem_size: int,
    rsdp_addr: int,
) -> BootConfig:
    """Step 2: the command line, the initrd as module 0 (`struct hvm_modlist_entry`), the
    E820 map as `struct hvm_memmap_table_entry`s and `struct hvm_start_info` (start_info.h),
    then the PROTECTED32 entry at `loaded.entry` with EBX = the start info (pvh.pandoc)."""
    cmd = write_cmdline(mem, cmdline, COMMAND_LINE_SIZE - 1)

    initrd = None
    nr_modules = modlist = 0
    if initrd_path is not None:
        initrd = load_initrd(mem, initrd_path, loaded.kernel_end, layout.low_ram_top(mem_size))
        modlist, nr_modules = layout.PVH_MODLIST_ADDR, 1
        mem.write_struct(modlist, HVM_MODLIST_ENTRY, initrd.base, initrd.size, 0, 0)

    e820 = layout.e820_map(mem_size)
    table = b"".join(HVM_MEMMAP_TABLE_ENTRY.pack(e.addr, e.size, e.type, 0) for e in e820)
    assert layout.PVH_MEMMAP_ADDR + len(table) <= layout.PVH_START_INFO.end
    mem.write(layout.PVH_MEMMAP_ADDR, table)

    start_info = layout.PVH_START_INFO.base
    mem.write_struct(
        start_info,
        HVM_START_INFO,
        XEN_HVM_START_MAGIC_VALUE,
        HVM_START_INFO_VERSION,
        0,  # flags
        nr_modules,
        modlist,
        cmd.base,
        rsdp_addr,
        layout.PVH_MEMMAP_ADDR,
        len(e820),
        0,
    )
    entry = setup_entry(mem, CpuMode.PROTECTED32, Registers(rip=loaded.entry, rbx=start_info))
    return BootConfig(BootProtocol.PVH, cmd, initrd, start_info, rsdp_addr, entry)
