"""The loaders' two steps, each on its own: LOAD writes only the image and returns a
`KernelLoaderResult`; CONFIGURE writes only the boot protocol's pieces and the entry."""

from __future__ import annotations

import pytest

from minivmm import layout
from minivmm.boot import BootProtocol, CpuMode, KernelLoaderResult, bzimage, configure_boot, load_image, pvh
from minivmm.memory import GuestMemory
from minivmm.ranges import AddressRange
from support.synthetic_kernels import make_bzimage, make_pvh_elf

MEM = 64 * layout.MiB
RSDP = 0xE0000
PADDR = 0x1000000
JUNK = b"\xcc"
PAYLOAD = bytes(0x200) + bytes(range(256)) * 8
# Everything the configure step writes below 1 MiB.
BOOT_AREAS = (layout.BOOT_GDT, layout.PVH_START_INFO, layout.ZERO_PAGE, layout.PAGE_TABLES, layout.CMDLINE)


def junk_memory() -> GuestMemory:
    mem = GuestMemory.anonymous(MEM)
    mem.view(0, MEM)[:] = JUNK * MEM
    return mem


def untouched(mem: GuestMemory, base: int, size: int) -> bool:
    return mem.read(base, size) == JUNK * size


def write_file(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- step 1: load only --------------------------------------------------------------------------


def test_load_elf_writes_the_image_and_nothing_else(tmp_path) -> None:
    code = bytes(range(256)) * 4
    path = write_file(tmp_path, "vmlinux", make_pvh_elf(code, PADDR, bss=0x1000, entry_offset=0x20))
    mem = junk_memory()
    loaded = load_image(mem, path, MEM)
    assert loaded == KernelLoaderResult(
        kernel=AddressRange(PADDR, len(code) + 0x1000), kernel_end=PADDR + len(code) + 0x1000, entry=PADDR + 0x20
    )
    assert loaded.protocol is BootProtocol.PVH and loaded.setup_header is None
    assert mem.read(PADDR, len(code)) == code and mem.read(PADDR + len(code), 0x1000) == bytes(0x1000)
    for area in BOOT_AREAS:
        assert untouched(mem, area.base, area.size), area.name


def test_load_bzimage_writes_the_image_and_nothing_else(tmp_path) -> None:
    image = make_bzimage(PAYLOAD, init_size=0x800000, pref_address=0x1000000)
    setup = 5 * 512
    mem = junk_memory()
    loaded = load_image(mem, write_file(tmp_path, "bzImage", image), MEM)
    assert loaded.protocol is BootProtocol.BZIMAGE
    assert loaded.kernel == AddressRange(layout.HIGH_MEMORY, len(image) - setup)
    assert loaded.entry == layout.HIGH_MEMORY + bzimage.STARTUP_64_OFFSET
    assert loaded.kernel_end == 0x1000000 + 0x800000  # runtime start + init_size
    assert loaded.setup_header is not None and loaded.setup_header.version == 0x020F
    assert loaded.setup_header_bytes == image[0x1F1 : 0x202 + image[0x201]]
    assert mem.read(layout.HIGH_MEMORY, len(image) - setup) == image[setup:]
    for area in BOOT_AREAS:
        assert untouched(mem, area.base, area.size), area.name


# --- step 2: configure only (no image in memory) ------------------------------------------------


def test_configure_pvh_without_loading(tmp_path) -> None:
    """Configure from a hand-made load result: the start info, cmdline, module and entry."""
    loaded = KernelLoaderResult(kernel=AddressRange(PADDR, 0x1000), kernel_end=PADDR + 0x1000, entry=PADDR + 0x40)
    initrd = write_file(tmp_path, "initrd", b"\x11" * 5000)
    mem = junk_memory()
    cfg = configure_boot(mem, loaded, initrd, "console=ttyS0", MEM, RSDP)
    assert cfg.protocol is BootProtocol.PVH and cfg.boot_info == layout.PVH_START_INFO.base
    assert cfg.entry.mode is CpuMode.PROTECTED32
    assert (cfg.entry.regs.rip, cfg.entry.regs.rbx) == (PADDR + 0x40, layout.PVH_START_INFO.base)
    assert cfg.cmdline == AddressRange(layout.CMDLINE.base, len("console=ttyS0") + 1)
    assert cfg.initrd is not None and mem.read(cfg.initrd.base, 5000) == b"\x11" * 5000
    magic, _, _, nr_modules, _, cmdline, rsdp, *_ = mem.read_struct(cfg.boot_info, pvh.HVM_START_INFO)
    assert (magic, nr_modules, cmdline, rsdp) == (pvh.XEN_HVM_START_MAGIC_VALUE, 1, layout.CMDLINE.base, RSDP)
    assert untouched(mem, PADDR, 0x1000)  # the image is step 1's business
    assert untouched(mem, layout.ZERO_PAGE.base, layout.ZERO_PAGE.size)
    assert untouched(mem, layout.PAGE_TABLES.base, layout.PAGE_TABLES.size)  # paging is off


def test_configure_linux_without_loading(tmp_path) -> None:
    image = make_bzimage(PAYLOAD, cmdline_size=100)
    hdr, _ = bzimage.parse_setup_header("bzImage", image)
    raw = image[0x1F1 : 0x202 + image[0x201]]
    loaded = KernelLoaderResult(AddressRange(layout.HIGH_MEMORY, 0x1000), 0x1800000, 0x100200, hdr, raw)
    mem = junk_memory()
    cfg = configure_boot(mem, loaded, None, "root=/dev/vda", MEM, RSDP)
    zp = layout.ZERO_PAGE.base
    assert cfg.protocol is BootProtocol.BZIMAGE and cfg.boot_info == zp and cfg.initrd is None
    assert cfg.entry.mode is CpuMode.LONG64
    assert (cfg.entry.regs.rip, cfg.entry.regs.rsi) == (0x100200, zp)
    assert cfg.entry.cr3 == layout.PML4_ADDR and not untouched(mem, layout.PAGE_TABLES.base, 8)
    written = bzimage.SetupHeader.unpack(mem.read(zp + 0x1F1, bzimage.SetupHeader.FORMAT.size))
    assert (written.cmd_line_ptr, written.ramdisk_image, written.type_of_loader) == (layout.CMDLINE.base, 0, 0xFF)
    assert mem.read_int(zp + bzimage.BP_ACPI_RSDP_ADDR, 8) == RSDP
    assert untouched(mem, layout.HIGH_MEMORY, 0x1000)  # the image is step 1's business
    assert untouched(mem, layout.PVH_START_INFO.base, layout.PVH_START_INFO.size)


def test_configure_linux_needs_a_setup_header() -> None:
    loaded = KernelLoaderResult(kernel=AddressRange(PADDR, 0x1000), kernel_end=PADDR + 0x1000, entry=PADDR)
    with pytest.raises(ValueError, match="setup header"):
        bzimage.configure_linux(junk_memory(), loaded, b"", None, MEM, RSDP)
