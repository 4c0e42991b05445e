"""PVH boot of an uncompressed ELF `vmlinux` (Xen's PVH boot ABI, docs/misc/pvh.pandoc).

The kernel advertises its 32-bit entry point in an ELF note of name "Xen" and type
XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h). Step 1, `load_elf`, copies every
PT_LOAD segment to its physical address `p_paddr`. Step 2, `configure_pvh`, builds
`struct hvm_start_info` version 1 (xen/include/public/arch-x86/hvm/start_info.h) with the
memory map, one module (the initrd) and the command line, and the entry state: 32-bit
protected mode with paging off, flat segments and EBX = the start info address
(pvh.pandoc, "x86/HVM direct boot ABI").
"""

from __future__ import annotations

import io
import os
import struct

from elftools.common.exceptions import ELFError, ELFParseError
from elftools.elf.elffile import ELFFile

from .. import layout
from ..errors import UserError
from ..memory import GuestMemory
from ..ranges import AddressRange
from .common import COMMAND_LINE_SIZE, BootConfig, BootProtocol, KernelLoaderResult, check_ram, load_initrd, write_cmdline
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

_NOTE_HEADER = struct.Struct("<III")  # namesz, descsz, type (ELF64 notes use 4-byte words)


def _align4(n: int) -> int:
    return (n + 3) & ~3


def iter_notes(data: bytes):
    """Yield (name, type, desc) from the bytes of a PT_NOTE segment or SHT_NOTE section."""
    off = 0
    while off + _NOTE_HEADER.size <= len(data):
        namesz, descsz, ntype = _NOTE_HEADER.unpack_from(data, off)
        off += _NOTE_HEADER.size
        name = data[off : off + namesz].rstrip(b"\0")
        off += _align4(namesz)
        desc = data[off : off + descsz]
        off += _align4(descsz)
        if len(desc) < descsz:
            return
        yield name, ntype, desc


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def _parse(path: str, data: bytes):
    """Validate the ELF header and return (segments as (paddr, offset, filesz, memsz), entry)."""
    if len(data) < 64:
        raise UserError(f"kernel {path}: truncated ELF file ({len(data)} bytes)")
    if data[4] != 2:
        raise UserError(f"kernel {path}: not a 64-bit ELF file (PVH boot needs an x86-64 vmlinux)")
    try:
        elf = ELFFile(io.BytesIO(data))
        hdr = elf.header
        if not elf.little_endian or hdr["e_machine"] != "EM_X86_64":
            raise UserError(f"kernel {path}: ELF file is not for x86-64 (machine {hdr['e_machine']})")
        if hdr["e_type"] != "ET_EXEC":
            raise UserError(f"kernel {path}: ELF file is not an executable ({hdr['e_type']}); expected a vmlinux")
        if hdr["e_phoff"] + hdr["e_phnum"] * hdr["e_phentsize"] > len(data):
            raise UserError(f"kernel {path}: truncated ELF file (program headers past the end of the file)")
        loads: list[tuple[int, int, int, int]] = []
        entry = None
        for seg in elf.iter_segments():
            ph = seg.header
            if ph["p_type"] not in ("PT_LOAD", "PT_NOTE"):
                continue
            if ph["p_offset"] + ph["p_filesz"] > len(data):
                raise UserError(
                    f"kernel {path}: truncated ELF file: segment at file offset {ph['p_offset']:#x}+{ph['p_filesz']:#x} "
                    f"is past the end of the file ({len(data)} bytes)"
                )
            if ph["p_type"] == "PT_LOAD":
                if ph["p_filesz"] > ph["p_memsz"]:
                    raise UserError(f"kernel {path}: malformed ELF segment (p_filesz > p_memsz)")
                loads.append((ph["p_paddr"], ph["p_offset"], ph["p_filesz"], ph["p_memsz"]))
            elif entry is None:
                entry = _phys32_entry(data[ph["p_offset"] : ph["p_offset"] + ph["p_filesz"]])
    except (ELFError, ELFParseError, struct.error, ValueError, EOFError) as exc:
        raise UserError(f"kernel {path}: malformed or truncated ELF file ({exc})") from None
    if not loads:
        raise UserError(f"kernel {path}: ELF file has no PT_LOAD segment")
    if entry is None:
        raise UserError(
            f"kernel {path}: ELF file has no PVH entry point (no Xen note XEN_ELFNOTE_PHYS32_ENTRY); "
            "build the kernel with CONFIG_PVH=y or boot the bzImage"
        )
    return loads, entry


def _phys32_entry(notes: bytes) -> int | None:
    for name, ntype, desc in iter_notes(notes):
        if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
            return int.from_bytes(desc, "little")
    return None


def load_elf(mem: GuestMemory, kernel_path: str | os.PathLike[str], data: bytes, mem_size: int) -> KernelLoaderResult:
    """Step 1: copy the PT_LOAD segments of the ELF `data` to their physical addresses in
    guest RAM laid out for `mem_size`, zeroing the bss tails; the entry is the PVH note's."""
    path = os.fspath(kernel_path)
    loads, entry = _parse(path, data)
    low_top = layout.low_ram_top(mem_size)
    for paddr, offset, filesz, memsz in loads:
        if paddr < layout.HIGH_MEMORY or paddr + memsz > low_top:
            raise UserError(
                f"kernel {path}: segment at {paddr:#x}-{paddr + memsz:#x} does not fit in guest RAM "
                f"[{layout.HIGH_MEMORY:#x}, {low_top:#x}); give the guest more memory"
            )
        check_ram(mem, paddr, memsz, f"kernel {path}: segment")
        mem.write(paddr, data[offset : offset + filesz])
        if memsz > filesz:
            mem.view(paddr + filesz, memsz - filesz)[:] = bytes(memsz - filesz)
    kstart = min(p for p, _, _, _ in loads)
    kend = max(p + m for p, _, _, m in loads)
    if not kstart <= entry < kend:
        raise UserError(f"kernel {path}: PVH entry point {entry:#x} is outside the loaded image {kstart:#x}-{kend:#x}")
    return KernelLoaderResult(kernel=AddressRange(kstart, kend - kstart), kernel_end=kend, entry=entry)


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
