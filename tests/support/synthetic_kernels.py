"""Tiny hand-built kernels in both boot formats, for the tests (test support, not product).

`make_elf` writes an ELF64 executable (System V gABI, "ELF Header" and "Program Header")
with PT_LOAD and PT_NOTE segments; `make_bzimage` a file with a valid setup header
(boot.rst) around a given protected-mode payload. `smoke_code` is x86 code, valid in both
32-bit protected mode and 64-bit mode, that prints a message on COM1 and then powers the
machine off through the ACPI sleep control register, so a machine can be tested end to end
in milliseconds without a real kernel.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from minivmm import layout
from minivmm.boot.acpi import S5_SLP_TYP
from minivmm.devices.acpi_pm import SLP_EN, SLP_TYP_SHIFT
from minivmm.boot.bzimage import (
    HDRS_MAGIC,
    LOADED_HIGH,
    SETUP_HEADER_OFFSET,
    XLF_KERNEL_64,
    SetupHeader,
)
from minivmm.boot.pvh import XEN_ELFNOTE_PHYS32_ENTRY

ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
PT_LOAD = 1
PT_NOTE = 4
ET_EXEC = 2
EM_X86_64 = 62
KERNEL_VIRT_OFFSET = 0xFFFFFFFF80000000  # __START_KERNEL_map, as in a real vmlinux


def elf_note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % 4)

    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def make_elf(
    segments: Sequence[tuple[int, bytes, int]],
    notes: Sequence[tuple[bytes, int, bytes]] = (),
    *,
    entry: int = 0,
    elfclass: int = 2,
    e_type: int = ET_EXEC,
    machine: int = EM_X86_64,
) -> bytes:
    """An ELF64 file: one PT_LOAD per (paddr, data, memsz) and one PT_NOTE holding `notes`."""
    note_blob = b"".join(elf_note(*n) for n in notes)
    nph = len(segments) + (1 if notes else 0)
    offset = ELF64_EHDR.size + nph * ELF64_PHDR.size
    phdrs, body = [], b""
    for paddr, data, memsz in segments:
        pad = bytes(-(offset + len(body)) % 16)
        body += pad
        phdrs.append(ELF64_PHDR.pack(PT_LOAD, 7, offset + len(body), paddr + KERNEL_VIRT_OFFSET, paddr, len(data), memsz, 16))
        body += data
    if notes:
        body += bytes(-(offset + len(body)) % 4)
        phdrs.append(ELF64_PHDR.pack(PT_NOTE, 4, offset + len(body), 0, 0, len(note_blob), len(note_blob), 4))
        body += note_blob
    ident = b"\x7fELF" + bytes([elfclass, 1, 1]) + bytes(9)
    ehdr = ELF64_EHDR.pack(ident, e_type, machine, 1, entry, ELF64_EHDR.size, 0, 0, ELF64_EHDR.size, ELF64_PHDR.size, nph, 64, 0, 0)
    return ehdr + b"".join(phdrs) + body


def make_pvh_elf(code: bytes, paddr: int = 0x1000000, bss: int = 0x1000, entry_offset: int = 0) -> bytes:
    """A vmlinux-like ELF: `code` loaded at `paddr` and the PVH entry note pointing at it."""
    note = (b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", paddr + entry_offset))
    return make_elf([(paddr, code, len(code) + bss)], [(b"Linux", 6, b"6.1.0\0"), note], entry=paddr + KERNEL_VIRT_OFFSET)


def make_bzimage(
    payload: bytes,
    *,
    version: int = 0x020F,
    setup_sects: int = 4,
    init_size: int = 0x800000,
    pref_address: int = 0x1000000,
    xloadflags: int = XLF_KERNEL_64,
    loadflags: int = LOADED_HIGH,
    initrd_addr_max: int = 0x7FFFFFFF,
    cmdline_size: int = 2047,
    relocatable_kernel: int = 1,
    kernel_alignment: int = 0x200000,
) -> bytes:
    """A bzImage-shaped file: (setup_sects + 1) sectors of setup holding the header, then
    `payload` (the protected-mode kernel; the 64-bit entry is payload offset 0x200)."""
    payload = payload + bytes(-len(payload) % 16)
    sects = setup_sects or 4
    hdr = SetupHeader.unpack(b"")
    fields = {
        "setup_sects": setup_sects,
        "syssize": len(payload) // 16,
        "vid_mode": 0xFFFF,
        "boot_flag": 0xAA55,
        "jump": 0xEB | ((0x26C - 0x202) << 8),
        "header": HDRS_MAGIC,
        "version": version,
        "loadflags": loadflags,
        "code32_start": layout.HIGH_MEMORY,
        "initrd_addr_max": initrd_addr_max,
        "kernel_alignment": kernel_alignment,
        "relocatable_kernel": relocatable_kernel,
        "xloadflags": xloadflags,
        "cmdline_size": cmdline_size,
        "pref_address": pref_address,
        "init_size": init_size,
    }
    for key, value in fields.items():
        setattr(hdr, key, value)
    setup = bytearray((sects + 1) * 512)
    raw = hdr.pack()
    setup[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(raw)] = raw
    return bytes(setup) + payload


def smoke_code(message: bytes = b"minivmm: synthetic kernel\n") -> bytes:
    """x86 code (same bytes in 32- and 64-bit mode): write `message` to COM1's THR, write
    SLP_TYP(S5) | SLP_EN to the sleep control port, then halt forever."""
    code = bytearray(b"\x66\xba" + struct.pack("<H", layout.COM1_PORT))  # mov dx, COM1
    for ch in message:
        code += bytes([0xB0, ch, 0xEE])  # mov al, ch; out dx, al
    code += b"\x66\xba" + struct.pack("<H", layout.ACPI_SLEEP_CONTROL_PORT)  # mov dx, SLEEP_CONTROL
    code += bytes([0xB0, (S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN, 0xEE])  # mov al, 0x34; out dx, al
    code += b"\xf4\xeb\xfd"  # hlt; jmp hlt
    return bytes(code)


def smoke_pvh_elf(message: bytes = b"minivmm: synthetic PVH kernel\n") -> bytes:
    return make_pvh_elf(smoke_code(message))


def smoke_bzimage(message: bytes = b"minivmm: synthetic bzImage kernel\n") -> bytes:
    return make_bzimage(bytes(0x200) + smoke_code(message))
