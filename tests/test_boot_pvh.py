"""PVH loading of a synthetic ELF vmlinux: hvm_start_info, memmap, modlist, entry state, errors."""

from __future__ import annotations

import dataclasses
import os
import struct

import pytest

from minivmm import layout
from minivmm.boot import BootProtocol, CpuMode, entry, load_kernel, pvh
from minivmm.errors import UserError
from minivmm.memory import GuestMemory
from minivmm.ranges import AddressRange
from support import synthetic_kernels as synthetic
from support.descriptors import decode_descriptor

MEM = 256 * layout.MiB
RSDP = 0xE0000
PADDR = 0x1000000


@pytest.fixture
def files(tmp_path):
    code = bytes(range(256)) * 16
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(synthetic.make_pvh_elf(code, PADDR, bss=0x3000, entry_offset=0x10))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(os.urandom(300_000))
    return kernel, initrd, code


def junk_memory(size: int = MEM) -> GuestMemory:
    mem = GuestMemory.anonymous(size)
    mem.view(0, size)[:] = b"\xcc" * size  # so zeroing and NUL termination are tested
    return mem


def test_segments_copied_and_bss_zeroed(files):
    kernel, initrd, code = files
    mem = junk_memory()
    boot = load_kernel(mem, kernel, initrd, "console=ttyS0", MEM, RSDP, BootProtocol.PVH)
    assert mem.read(PADDR, len(code)) == code
    assert mem.read(PADDR + len(code), 0x3000) == bytes(0x3000)
    assert boot.loaded.kernel.base == PADDR and boot.loaded.kernel.size == len(code) + 0x3000
    assert boot.entry.regs.rip == PADDR + 0x10
    assert boot.config.protocol is BootProtocol.PVH


def test_start_info_fields(files):
    kernel, initrd, _ = files
    mem = junk_memory()
    boot = load_kernel(mem, kernel, initrd, "console=ttyS0 quiet", MEM, RSDP, BootProtocol.PVH)
    assert boot.entry.regs.rbx == boot.config.boot_info == layout.PVH_START_INFO.base
    (magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, memmap_entries, reserved) = mem.read_struct(
        boot.entry.regs.rbx, pvh.HVM_START_INFO
    )
    assert magic == 0x336EC578 and version == 1 and flags == 0 and reserved == 0
    assert rsdp == RSDP
    # The command line is NUL terminated.
    text = b"console=ttyS0 quiet"
    assert mem.read(cmdline, len(text) + 1) == text + b"\0"
    # The memmap is the E820 map.
    e820 = layout.e820_map(MEM)
    assert memmap_entries == len(e820)
    for i, e in enumerate(e820):
        addr, size, typ, res = mem.read_struct(memmap + i * pvh.HVM_MEMMAP_TABLE_ENTRY.size, pvh.HVM_MEMMAP_TABLE_ENTRY)
        assert (addr, size, typ, res) == (e.addr, e.size, e.type, 0)
    # One module: the initrd bytes, page aligned, high in low RAM, above the kernel.
    assert nr_modules == 1
    paddr, size, mod_cmdline, mod_res = mem.read_struct(modlist, pvh.HVM_MODLIST_ENTRY)
    assert mem.read(paddr, size) == initrd.read_bytes()
    assert paddr % 4096 == 0 and paddr >= boot.loaded.kernel.end and paddr + size <= MEM
    assert MEM - (paddr + size) < 4096
    assert boot.config.initrd == AddressRange(paddr, size)
    assert mod_cmdline == 0 and mod_res == 0


def test_no_initrd_means_no_modules(files):
    kernel, _, _ = files
    mem = junk_memory()
    boot = load_kernel(mem, kernel, None, "", MEM, RSDP, BootProtocol.PVH)
    _, _, _, nr_modules, modlist, cmdline, *_ = mem.read_struct(boot.entry.regs.rbx, pvh.HVM_START_INFO)
    assert nr_modules == 0 and modlist == 0 and boot.config.initrd is None
    assert mem.read(cmdline, 1) == b"\0"


def test_entry_state_is_32bit_protected_mode(files):
    kernel, _, _ = files
    mem = junk_memory()
    e = load_kernel(mem, kernel, None, "", MEM, RSDP, BootProtocol.PVH).entry
    assert e.mode is CpuMode.PROTECTED32
    assert e.cr0 & entry.X86_CR0_PE and not e.cr0 & entry.X86_CR0_PG
    assert e.cr4 == 0 and e.efer == 0
    assert not e.regs.rflags & (1 << 9)  # IF clear
    for name in ("ds", "es", "fs", "gs", "ss"):
        seg = getattr(e, name)
        assert (seg.base, seg.limit, seg.present, seg.s, seg.db, seg.g) == (0, 0xFFFFFFFF, 1, 1, 1, 1)
        assert seg.type & 0x8 == 0 and seg.type & 0x2  # writable data
    assert (e.cs.base, e.cs.limit, e.cs.db, e.cs.l, e.cs.type & 0x8) == (0, 0xFFFFFFFF, 1, 0, 0x8)
    assert e.tr.type == 11 and e.tr.limit == 0x67 and e.tr.s == 0
    assert e.ldt.present == 0
    # The GDT in memory holds exactly the descriptors the segment registers were given.
    for seg in (e.cs, e.ds, e.tr):
        raw = mem.read_int(e.gdt.base + seg.selector, 8)
        assert decode_descriptor(seg.selector, raw) == seg
    assert e.gdt.limit == entry.GDT_SIZE - 1
    assert {f.name for f in dataclasses.fields(e.regs)} == {"rip", "rsp", "rbx", "rsi", "rflags"}


def test_note_parser_handles_multiple_notes():
    blob = synthetic.elf_note(b"GNU", 3, b"\x01\x02\x03") + synthetic.elf_note(b"Xen", 18, struct.pack("<I", 0x1234))
    assert list(pvh.iter_notes(blob)) == [(b"GNU", 3, b"\x01\x02\x03"), (b"Xen", 18, struct.pack("<I", 0x1234))]


# --- errors -------------------------------------------------------------------------------------


def load(tmp_path, blob: bytes, *, mem_size: int = MEM, initrd: bytes | None = None, cmdline: str = ""):
    kernel = tmp_path / "kernel"
    kernel.write_bytes(blob)
    initrd_path = None
    if initrd is not None:
        initrd_path = tmp_path / "initrd"
        initrd_path.write_bytes(initrd)
    return load_kernel(GuestMemory.anonymous(mem_size), kernel, initrd_path, cmdline, mem_size, RSDP, BootProtocol.PVH)


def test_random_bytes_are_rejected(tmp_path):
    with pytest.raises(UserError, match=r"kernel .*kernel: not an ELF vmlinux or a bzImage"):
        load(tmp_path, os.urandom(8192).replace(b"HdrS", b"xxxx"))


def test_missing_kernel_file(tmp_path):
    with pytest.raises(UserError, match="nope.*No such file"):
        load_kernel(GuestMemory.anonymous(MEM), tmp_path / "nope", None, "", MEM, RSDP, BootProtocol.PVH)


def test_missing_initrd_file(tmp_path, files):
    kernel, _, _ = files
    with pytest.raises(UserError, match="initrd .*missing.*No such file"):
        load_kernel(GuestMemory.anonymous(MEM), kernel, tmp_path / "missing", "", MEM, RSDP, BootProtocol.PVH)


@pytest.mark.parametrize("cut", [10, 63, 100, 200, 2000])
def test_truncated_elf(tmp_path, cut):
    blob = synthetic.make_pvh_elf(b"\x90" * 4096)
    with pytest.raises(UserError, match="truncated"):
        load(tmp_path, blob[:cut])


def test_truncated_elf_at_the_end(tmp_path):
    blob = synthetic.make_pvh_elf(b"\x90" * 4096)
    with pytest.raises(UserError, match="truncated"):
        load(tmp_path, blob[:-1])


def test_elf_without_pvh_note(tmp_path):
    blob = synthetic.make_elf([(PADDR, b"\x90" * 64, 64)], [(b"Linux", 6, b"x\0")])
    with pytest.raises(UserError, match="no PVH entry point.*XEN_ELFNOTE_PHYS32_ENTRY"):
        load(tmp_path, blob)


def test_elf32_rejected(tmp_path):
    blob = bytearray(synthetic.make_pvh_elf(b"\x90"))
    blob[4] = 1
    with pytest.raises(UserError, match="not a 64-bit ELF"):
        load(tmp_path, bytes(blob))


def test_wrong_machine_rejected(tmp_path):
    blob = synthetic.make_elf([(PADDR, b"\x90", 1)], [(b"Xen", 18, struct.pack("<I", PADDR))], machine=183)
    with pytest.raises(UserError, match="not for x86-64"):
        load(tmp_path, blob)


def test_not_executable_rejected(tmp_path):
    blob = synthetic.make_elf([(PADDR, b"\x90", 1)], [(b"Xen", 18, struct.pack("<I", PADDR))], e_type=3)
    with pytest.raises(UserError, match="not an executable"):
        load(tmp_path, blob)


def test_entry_outside_image_rejected(tmp_path):
    blob = synthetic.make_elf([(PADDR, b"\x90", 1)], [(b"Xen", 18, struct.pack("<I", 0x5000))])
    with pytest.raises(UserError, match="outside the loaded image"):
        load(tmp_path, blob)


def test_kernel_does_not_fit_in_small_memory(tmp_path):
    blob = synthetic.make_pvh_elf(b"\x90" * 4096, bss=8 * layout.MiB)
    with pytest.raises(UserError, match="does not fit in guest RAM"):
        load(tmp_path, blob, mem_size=20 * layout.MiB)


def test_too_small_memory(tmp_path):
    with pytest.raises(UserError, match="too small"):
        load(tmp_path, synthetic.make_pvh_elf(b"\x90"), mem_size=4 * layout.MiB)


def test_oversized_initrd(tmp_path):
    with pytest.raises(UserError, match=r"initrd .*initrd: .* do not fit in guest RAM"):
        load(tmp_path, synthetic.make_pvh_elf(b"\x90"), mem_size=32 * layout.MiB, initrd=bytes(20 * layout.MiB))


def test_too_long_cmdline(tmp_path):
    with pytest.raises(UserError, match="command line is too long: 3000 bytes"):
        load(tmp_path, synthetic.make_pvh_elf(b"\x90"), cmdline="x" * 3000)


def test_cmdline_with_nul(tmp_path):
    with pytest.raises(UserError, match="NUL"):
        load(tmp_path, synthetic.make_pvh_elf(b"\x90"), cmdline="a\0b")


def test_smoke_pvh_entry_is_the_smoke_code(tmp_path):
    kernel = tmp_path / "smoke"
    kernel.write_bytes(synthetic.smoke_pvh_elf(b"hi\n"))
    mem = GuestMemory.anonymous(MEM)
    e = load_kernel(mem, kernel, None, "", MEM, RSDP, BootProtocol.PVH).entry
    code = synthetic.smoke_code(b"hi\n")
    assert mem.read(e.regs.rip, len(code)) == code
    assert code.endswith(b"\xb0\x34\xee\xf4\xeb\xfd")  # out 0x34 to the sleep register; hlt loop


def test_pvh_memory_above_4gib(tmp_path, files):
    kernel, initrd, _ = files
    size = 3 * layout.GiB + 64 * layout.MiB
    mem = GuestMemory()
    for gpa, length in layout.ram_ranges(size):
        mem.add_region(GuestMemory.anonymous(length, gpa).regions[0])
    boot = load_kernel(mem, kernel, initrd, "", size, RSDP, BootProtocol.PVH)
    assert boot.config.initrd.end <= 3 * layout.GiB and 3 * layout.GiB - boot.config.initrd.end < 4096
    *_, memmap, entries, _ = mem.read_struct(boot.entry.regs.rbx, pvh.HVM_START_INFO)
    last = mem.read_struct(memmap + (entries - 1) * 24, pvh.HVM_MEMMAP_TABLE_ENTRY)
    assert last == (4 * layout.GiB, 64 * layout.MiB, layout.E820_RAM, 0)
