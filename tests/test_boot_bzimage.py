"""bzImage loading (boot.rst 64-bit protocol) of a synthetic image: boot_params, page tables, GDT."""

from __future__ import annotations

import os
import struct

import pytest

from minivmm import layout
from minivmm.boot import BootProtocol, CpuMode, bzimage, entry, load_kernel
from minivmm.errors import UserError
from minivmm.memory import GuestMemory
from minivmm.ranges import AddressRange
from support import synthetic_kernels as synthetic
from support.descriptors import decode_descriptor

MEM = 256 * layout.MiB
RSDP = 0xE0000
ZP = layout.ZERO_PAGE.base


def hdr_field(mem: GuestMemory, name: str) -> int:
    raw = mem.read(ZP + bzimage.SETUP_HEADER_OFFSET, bzimage.SetupHeader.FORMAT.size)
    return getattr(bzimage.SetupHeader.unpack(raw), name)


def boot(tmp_path, image: bytes, *, initrd: bytes | None = None, cmdline: str = "console=ttyS0", mem_size: int = MEM):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(image)
    initrd_path = None
    if initrd is not None:
        initrd_path = tmp_path / "initrd.img"
        initrd_path.write_bytes(initrd)
    mem = GuestMemory.anonymous(mem_size)
    mem.view(0, 2 * layout.MiB)[:] = b"\xcc" * (2 * layout.MiB)
    return mem, load_kernel(mem, kernel, initrd_path, cmdline, mem_size, RSDP)


PAYLOAD = bytes(0x200) + bytes(range(256)) * 64


def test_kernel_loaded_at_1mib_and_entry(tmp_path):
    image = synthetic.make_bzimage(PAYLOAD)
    mem, b = boot(tmp_path, image)
    setup = 5 * 512
    assert mem.read(layout.HIGH_MEMORY, len(image) - setup) == image[setup:]
    assert b.loaded.kernel == AddressRange(layout.HIGH_MEMORY, len(image) - setup)
    assert b.entry.regs.rip == layout.HIGH_MEMORY + 0x200
    assert b.entry.regs.rsi == b.config.boot_info == ZP and b.config.protocol is BootProtocol.BZIMAGE
    assert b.entry.mode is CpuMode.LONG64


def test_boot_params_fields(tmp_path):
    image = synthetic.make_bzimage(PAYLOAD)
    initrd = os.urandom(123_457)
    mem, _e = boot(tmp_path, image, initrd=initrd, cmdline="console=ttyS0 root=/dev/ram")
    assert hdr_field(mem, "type_of_loader") == 0xFF
    flags = hdr_field(mem, "loadflags")
    assert flags & bzimage.LOADED_HIGH and flags & bzimage.CAN_USE_HEAP and not flags & bzimage.KEEP_SEGMENTS
    assert hdr_field(mem, "heap_end_ptr") == layout.SETUP_HEAP_END - 0x200
    assert hdr_field(mem, "version") == 0x020F
    cmd = hdr_field(mem, "cmd_line_ptr")
    assert cmd == layout.CMDLINE.base and mem.read_int(ZP + bzimage.BP_EXT_CMD_LINE_PTR, 4) == 0
    assert mem.read(cmd, 28) == b"console=ttyS0 root=/dev/ram\0"
    image_addr, size = hdr_field(mem, "ramdisk_image"), hdr_field(mem, "ramdisk_size")
    assert size == len(initrd) and mem.read(image_addr, size) == initrd
    assert image_addr % 4096 == 0 and image_addr + size <= hdr_field(mem, "initrd_addr_max") + 1
    assert image_addr + size <= MEM and MEM - (image_addr + size) < 4096  # as high as possible
    assert image_addr >= 0x1000000 + 0x800000  # clear of runtime start + init_size
    assert mem.read_int(ZP + bzimage.BP_EXT_RAMDISK_IMAGE, 4) == 0
    assert mem.read_int(ZP + bzimage.BP_ACPI_RSDP_ADDR, 8) == RSDP
    # e820_table / e820_entries
    e820 = layout.e820_map(MEM)
    assert mem.read_int(ZP + bzimage.BP_E820_ENTRIES, 1) == len(e820)
    for i, entry in enumerate(e820):
        got = layout.E820Entry(*layout.E820Entry.FORMAT.unpack(mem.read(ZP + bzimage.BP_E820_TABLE + 20 * i, 20)))
        assert got == entry
    # Everything outside the header and the fields we set is zero.
    assert mem.read(ZP, 0x70) == bytes(0x70)


def test_header_copied_from_file(tmp_path):
    image = bytearray(synthetic.make_bzimage(PAYLOAD))
    image[0x1FA:0x1FC] = b"\x34\x12"  # vid_mode: the loader leaves it as in the file
    mem, _ = boot(tmp_path, bytes(image))
    hdr_len = 0x202 + image[0x201] - 0x1F1
    zp = mem.read(ZP + 0x1F1, hdr_len)
    # setup_data (0x250) is the loader's to write (boot.rst): the RNG seed's address.
    untouched = [(0x1F1, 0x210), (0x212, 0x218), (0x220, 0x224), (0x22C, 0x250), (0x258, 0x26C)]
    for lo, hi in untouched:
        assert zp[lo - 0x1F1 : hi - 0x1F1] == bytes(image[lo:hi]), hex(lo)
    assert mem.read_int(ZP + 0x250, 8) == layout.SETUP_DATA.base


def test_setup_sects_zero_means_four(tmp_path):
    image = synthetic.make_bzimage(PAYLOAD, setup_sects=0)
    mem, b = boot(tmp_path, image)
    assert mem.read(layout.HIGH_MEMORY, 16) == PAYLOAD[:16]
    assert b.loaded.kernel.size == len(image) - 5 * 512


def translate(mem: GuestMemory, cr3: int, va: int) -> int | None:
    """Walk 4-level paging (2 MiB pages) in guest memory."""
    pml4e = mem.read_int(cr3 + ((va >> 39) & 511) * 8, 8)
    if not pml4e & 1:
        return None
    pdpte = mem.read_int((pml4e & ~0xFFF & (2**52 - 1)) + ((va >> 30) & 511) * 8, 8)
    if not pdpte & 1:
        return None
    pde = mem.read_int((pdpte & ~0xFFF & (2**52 - 1)) + ((va >> 21) & 511) * 8, 8)
    if not pde & 1 or not pde & entry.PTE_PS or not pde & entry.PTE_RW:
        return None
    return (pde & ~(2**21 - 1) & (2**52 - 1)) | (va & (2**21 - 1))


def test_long_mode_state_and_identity_map(tmp_path):
    mem, b = boot(tmp_path, synthetic.make_bzimage(PAYLOAD))
    e = b.entry
    assert e.cr0 & entry.X86_CR0_PG and e.cr0 & entry.X86_CR0_PE
    assert e.cr4 & entry.X86_CR4_PAE and e.efer & entry.EFER_LME and e.efer & entry.EFER_LMA
    assert e.cr3 == layout.PML4_ADDR and e.cr3 in layout.PAGE_TABLES
    for va in (0, 0x1000, e.regs.rip, ZP, 0x0FFF_FFFF, 0xC000_0000, 0xFEC0_0000, 0xFFFF_FFFF):
        assert translate(mem, e.cr3, va) == va
    assert translate(mem, e.cr3, 4 * layout.GiB) is None
    assert not e.regs.rflags & (1 << 9)


def test_gdt_has_linux_boot_selectors(tmp_path):
    mem, b = boot(tmp_path, synthetic.make_bzimage(PAYLOAD))
    e = b.entry
    assert e.cs.selector == 0x10 and e.ds.selector == e.ss.selector == 0x18
    cs = decode_descriptor(0x10, mem.read_int(e.gdt.base + 0x10, 8))
    ds = decode_descriptor(0x18, mem.read_int(e.gdt.base + 0x18, 8))
    assert cs == e.cs and ds == e.ds
    assert cs.l == 1 and cs.db == 0 and cs.type & 0x8 and cs.present and cs.s
    assert ds.type == 0x3 and ds.present and ds.s and ds.limit == 0xFFFFFFFF
    assert mem.read_int(e.gdt.base, 8) == 0
    tss = decode_descriptor(0x20, mem.read_int(e.gdt.base + 0x20, 8))
    assert tss == e.tr and mem.read_int(e.gdt.base + 0x28, 8) == 0
    assert e.gdt.limit >= 0x2F


def test_initrd_respects_initrd_addr_max(tmp_path):
    image = synthetic.make_bzimage(PAYLOAD, initrd_addr_max=0x037FFFFF)
    _mem, b = boot(tmp_path, image, initrd=bytes(100_000))
    assert b.config.initrd.end <= 0x03800000 and 0x03800000 - b.config.initrd.end < 4096 + 4096


def test_old_protocol_has_no_rsdp_field(tmp_path):
    mem, _ = boot(tmp_path, synthetic.make_bzimage(PAYLOAD, version=0x020D))
    assert mem.read_int(ZP + bzimage.BP_ACPI_RSDP_ADDR, 8) == 0


# --- errors -------------------------------------------------------------------------------------


def test_bad_boot_flag(tmp_path):
    image = bytearray(synthetic.make_bzimage(PAYLOAD))
    image[0x1FE] = 0
    with pytest.raises(UserError, match="bzImage: not a bzImage"):
        boot(tmp_path, bytes(image))


def test_protocol_too_old(tmp_path):
    with pytest.raises(UserError, match="boot protocol 2.11 is too old"):
        boot(tmp_path, synthetic.make_bzimage(PAYLOAD, version=0x020B))


def test_not_64bit(tmp_path):
    with pytest.raises(UserError, match="XLF_KERNEL_64"):
        boot(tmp_path, synthetic.make_bzimage(PAYLOAD, xloadflags=0))


def test_zimage_rejected(tmp_path):
    with pytest.raises(UserError, match="zImage"):
        boot(tmp_path, synthetic.make_bzimage(PAYLOAD, loadflags=0))


@pytest.mark.parametrize("cut", [0x300, 5 * 512 + 100, -16])
def test_truncated(tmp_path, cut):
    image = synthetic.make_bzimage(PAYLOAD)
    with pytest.raises(UserError, match="truncated bzImage"):
        boot(tmp_path, image[:cut])


def test_init_size_does_not_fit(tmp_path):
    image = synthetic.make_bzimage(PAYLOAD, init_size=0x4000000)
    with pytest.raises(UserError, match="needs guest RAM up to 0x5000000 .* RAM ends at 0x2000000"):
        boot(tmp_path, image, mem_size=32 * layout.MiB)


def test_cmdline_longer_than_cmdline_size(tmp_path):
    image = synthetic.make_bzimage(PAYLOAD, cmdline_size=100)
    with pytest.raises(UserError, match="too long: 101 bytes, the kernel accepts at most 100"):
        boot(tmp_path, image, cmdline="x" * 101)
    _mem, b = boot(tmp_path, image, cmdline="x" * 100)
    assert b.config.cmdline.size == 101


def test_initrd_too_big_below_initrd_addr_max(tmp_path):
    image = synthetic.make_bzimage(PAYLOAD, initrd_addr_max=0x01FFFFFF)
    with pytest.raises(UserError, match="initrd .*initrd.img: .*do not fit"):
        boot(tmp_path, image, initrd=bytes(16 * layout.MiB))


def test_setup_header_struct_matches_spec_offsets():
    fmt = bzimage.SetupHeader.FORMAT
    names = [f.name for f in bzimage.SetupHeader.__dataclass_fields__.values()]
    offsets = {}
    off = 0x1F1
    for name, code in zip(names, fmt.format.lstrip("<")):
        offsets[name] = off
        off += struct.calcsize("<" + code)
    assert offsets["boot_flag"] == 0x1FE and offsets["header"] == 0x202 and offsets["version"] == 0x206
    assert offsets["type_of_loader"] == 0x210 and offsets["cmd_line_ptr"] == 0x228
    assert offsets["initrd_addr_max"] == 0x22C and offsets["xloadflags"] == 0x236
    assert offsets["pref_address"] == 0x258 and offsets["init_size"] == 0x260
    assert offsets["kernel_info_offset"] == 0x268


def test_memory_above_4gib_keeps_initrd_below_initrd_addr_max(tmp_path):
    """With RAM split at the PCI hole the initrd still goes below initrd_addr_max (2 GiB here)."""
    size = 3 * layout.GiB + 64 * layout.MiB
    mem = GuestMemory()
    for gpa, length in layout.ram_ranges(size):
        mem.add_region(GuestMemory.anonymous(length, gpa).regions[0])
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(synthetic.make_bzimage(PAYLOAD))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x5a" * 10_000)
    initrd_range = load_kernel(mem, kernel, initrd, "", size, RSDP).config.initrd
    assert initrd_range.end <= 0x80000000 and 0x80000000 - initrd_range.end < 4096
    assert mem.read(initrd_range.base, 10_000) == b"\x5a" * 10_000
    n = mem.read_int(ZP + bzimage.BP_E820_ENTRIES, 1)
    last = layout.E820Entry(*layout.E820Entry.FORMAT.unpack(mem.read(ZP + bzimage.BP_E820_TABLE + 20 * (n - 1), 20)))
    assert last == layout.E820Entry(4 * layout.GiB, 64 * layout.MiB, layout.E820_RAM)


def test_smoke_bzimage_entry_is_the_smoke_code(tmp_path):
    mem, b = boot(tmp_path, synthetic.smoke_bzimage(b"hi\n"))
    code = synthetic.smoke_code(b"hi\n")
    assert mem.read(b.entry.regs.rip, len(code)) == code
