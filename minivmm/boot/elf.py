"""Loading an uncompressed ELF `vmlinux`, whichever boot protocol then enters it.

`parse_elf` checks the ELF header (System V gABI, "ELF Header" and "Program Header") and
collects the PT_LOAD segments and the PT_NOTE contents; `load_segments` copies every PT_LOAD
segment to its physical address `p_paddr` and zeroes its bss tail. The PVH protocol
(`pvh.py`) enters at the address its Xen note names, the Linux 64-bit boot protocol
(`vmlinux.py`) at the ELF entry point.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from elftools.common.exceptions import ELFError, ELFParseError
from elftools.elf.elffile import ELFFile

from .. import layout
from ..errors import UserError
from ..memory import GuestMemory
from ..ranges import AddressRange
from .common import check_ram

_NOTE_HEADER = struct.Struct("<III")  # namesz, descsz, type (ELF64 notes use 4-byte words)


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD program header: where it goes (physical and virtual) and its file bytes."""

    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class ElfImage:
    """What the loaders need of a vmlinux: its PT_LOAD segments, e_entry and note bytes."""

    segments: tuple[Segment, ...]
    e_entry: int
    notes: tuple[bytes, ...]

    @property
    def span(self) -> AddressRange:
        """Physical addresses from the lowest segment start to the highest segment end (bss included)."""
        start = min(s.paddr for s in self.segments)
        return AddressRange(start, max(s.paddr + s.memsz for s in self.segments) - start)


def _align4(n: int) -> int:
    return (n + 3) & ~3


def iter_notes(data: bytes) -> Iterator[tuple[bytes, int, bytes]]:
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


def parse_elf(path: str, data: bytes) -> ElfImage:
    """Validate the ELF header and collect the PT_LOAD segments and PT_NOTE bytes."""
    if len(data) < 64:
        raise UserError(f"kernel {path}: truncated ELF file ({len(data)} bytes)")
    if data[4] != 2:
        raise UserError(f"kernel {path}: not a 64-bit ELF file (minivmm boots an x86-64 vmlinux)")
    try:
        elf = ELFFile(io.BytesIO(data))
        hdr = elf.header
        if not elf.little_endian or hdr["e_machine"] != "EM_X86_64":
            raise UserError(f"kernel {path}: ELF file is not for x86-64 (machine {hdr['e_machine']})")
        if hdr["e_type"] != "ET_EXEC":
            raise UserError(f"kernel {path}: ELF file is not an executable ({hdr['e_type']}); expected a vmlinux")
        if hdr["e_phoff"] + hdr["e_phnum"] * hdr["e_phentsize"] > len(data):
            raise UserError(f"kernel {path}: truncated ELF file (program headers past the end of the file)")
        segments: list[Segment] = []
        notes: list[bytes] = []
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
                segments.append(Segment(ph["p_paddr"], ph["p_vaddr"], ph["p_offset"], ph["p_filesz"], ph["p_memsz"]))
            else:
                notes.append(data[ph["p_offset"] : ph["p_offset"] + ph["p_filesz"]])
        e_entry = hdr["e_entry"]
    except (ELFError, ELFParseError, struct.error, ValueError, EOFError) as exc:
        raise UserError(f"kernel {path}: malformed or truncated ELF file ({exc})") from None
    if not segments:
        raise UserError(f"kernel {path}: ELF file has no PT_LOAD segment")
    return ElfImage(tuple(segments), e_entry, tuple(notes))


def load_segments(mem: GuestMemory, path: str, image: ElfImage, data: bytes, mem_size: int) -> AddressRange:
    """Copy the PT_LOAD segments to their physical addresses in guest RAM laid out for
    `mem_size`, zeroing the bss tails; returns the span they occupy."""
    low_top = layout.low_ram_top(mem_size)
    for s in image.segments:
        if s.paddr < layout.HIGH_MEMORY or s.paddr + s.memsz > low_top:
            raise UserError(
                f"kernel {path}: segment at {s.paddr:#x}-{s.paddr + s.memsz:#x} does not fit in guest RAM "
                f"[{layout.HIGH_MEMORY:#x}, {low_top:#x}); give the guest more memory"
            )
        check_ram(mem, s.paddr, s.memsz, f"kernel {path}: segment")
        mem.write(s.paddr, data[s.offset : s.offset + s.filesz])
        if s.memsz > s.filesz:
            mem.view(s.paddr + s.filesz, s.memsz - s.filesz)[:] = bytes(s.memsz - s.filesz)
    return image.span


def check_entry(path: str, what: str, entry: int, span: AddressRange) -> None:
    """UserError unless the entry point lies inside the loaded image."""
    if not span.base <= entry < span.end:
        raise UserError(f"kernel {path}: {what} {entry:#x} is outside the loaded image {span.base:#x}-{span.end:#x}")
