"""The loaders' two steps, each on its own: LOAD writes only the image and returns a
`KernelLoaderResult`; CONFIGURE writes only the boot protocol's pieces and the entry."""

from __future__ import annotations

import pytest

from minivmm import layout
from minivmm.boot import BootProtocol, CpuMode, KernelLoaderResult, bzimage, configure_boot, load_image, pvh
from minivmm.memory import GuestMemory
from minivmm.ranges import AddressRange
from minivmm.boot import setup_data
from minivmm.errors import UserError
from support.synthetic_kernels import KERNEL_VIRT_OFFSET, make_bzimage, make_elf, make_pvh_elf

MEM = 64 * layout.MiB
RSDP = 0xE0000
PADDR = 0x1000000
JUNK = b"\xcc"
PAYLOAD = bytes(0x200) + bytes(range(256)) * 8
# Everything the configure step writes below 1 MiB.
BOOT_AREAS = (layout.BOOT_GDT, layout.PVH_START_INFO, layout.SETUP_DATA, layout.ZERO_PAGE, layout.PAGE_TABLES, layout.CMDLINE)


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


def test_load_elf_for_pvh_writes_the_image_and_nothing_else(tmp_path) -> None:
    code = bytes(range(256)) * 4
    path = write_file(tmp_path, "vmlinux", make_pvh_elf(code, PADDR, bss=0x1000, entry_offset=0x20))
    mem = junk_memory()
    loaded = load_image(mem, path, MEM, BootProtocol.PVH)
    assert loaded == KernelLoaderResult(
        kernel=AddressRange(PADDR, len(code) + 0x1000), kernel_end=PADDR + len(code) + 0x1000, entry=PADDR + 0x20
    )
    assert loaded.protocol is BootProtocol.PVH and loaded.setup_header is None
    assert mem.read(PADDR, len(code)) == code and mem.read(PADDR + len(code), 0x1000) == bytes(0x1000)
    for area in BOOT_AREAS:
        assert untouched(mem, area.base, area.size), area.name


@pytest.mark.parametrize("e_entry", [PADDR + 0x40, PADDR + 0x40 + KERNEL_VIRT_OFFSET], ids=["physical", "virtual"])
def test_load_vmlinux_writes_the_image_and_nothing_else(tmp_path, e_entry: int) -> None:
    """The default for an ELF: the Linux 64-bit boot protocol enters at e_entry (physical as
    Linux links it, or translated through its segment) with a setup header minivmm writes."""
    code = bytes(range(256)) * 4
    path = write_file(tmp_path, "vmlinux", make_elf([(PADDR, code, len(code) + 0x1000)], entry=e_entry))  # no PVH note
    mem = junk_memory()
    loaded = load_image(mem, path, MEM)
    assert loaded.protocol is BootProtocol.LINUX and loaded.entry == PADDR + 0x40
    assert loaded.kernel == AddressRange(PADDR, len(code) + 0x1000) and loaded.kernel_end == PADDR + len(code) + 0x1000
    hdr = loaded.setup_header
    assert hdr is not None and loaded.setup_header_bytes == hdr.pack()
    assert (hdr.boot_flag, hdr.header, hdr.version) == (0xAA55, bzimage.HDRS_MAGIC, 0x020F)
    assert hdr.version >= bzimage.PROTOCOL_ACPI_RSDP  # so the kernel reads acpi_rsdp_addr
    assert hdr.loadflags == bzimage.LOADED_HIGH and hdr.xloadflags == bzimage.XLF_KERNEL_64
    assert (hdr.cmdline_size, hdr.initrd_addr_max, hdr.hardware_subarch) == (2047, 0x7FFFFFFF, 0)
    assert (hdr.pref_address, hdr.init_size, hdr.relocatable_kernel) == (PADDR, len(code) + 0x1000, 0)
    assert (hdr.kernel_alignment, hdr.min_alignment) == (0x200000, 21)
    assert mem.read(PADDR, len(code)) == code and mem.read(PADDR + len(code), 0x1000) == bytes(0x1000)
    for area in BOOT_AREAS:
        assert untouched(mem, area.base, area.size), area.name


def test_load_vmlinux_entry_outside_the_image_is_refused(tmp_path) -> None:
    path = write_file(tmp_path, "vmlinux", make_elf([(PADDR, b"\x90" * 64, 64)], entry=0x5000))
    with pytest.raises(UserError, match="ELF entry point 0x5000 is outside the loaded image"):
        load_image(junk_memory(), path, MEM)


def test_bzimage_with_pvh_is_a_user_error(tmp_path) -> None:
    path = write_file(tmp_path, "bzImage", make_bzimage(PAYLOAD))
    with pytest.raises(UserError, match="bzImage has no PVH entry; boot it with --boot linux"):
        load_image(junk_memory(), path, MEM, BootProtocol.PVH)


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
    assert untouched(mem, layout.SETUP_DATA.base, layout.SETUP_DATA.size)  # PVH has no setup_data
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


# --- setup_data: the RNG seed -------------------------------------------------------------------


def read_chain(mem: GuestMemory, addr: int) -> list[tuple[int, int, int, bytes]]:
    """(address, type, len, data) of every setup_data entry from `addr` on."""
    out = []
    while addr:
        nxt, typ, length = mem.read_struct(addr, setup_data.SETUP_DATA_HEADER)
        out.append((addr, typ, length, mem.read(addr + setup_data.SETUP_DATA_HEADER.size, length)))
        addr = nxt
    return out


@pytest.mark.parametrize("kind", ["vmlinux", "bzImage"])
def test_linux_boot_passes_a_fresh_rng_seed_as_setup_data(tmp_path, kind: str) -> None:
    """boot_params.hdr.setup_data (offset 0x250) points at one SETUP_RNG_SEED entry (type 9,
    32 bytes, next 0) in layout.SETUP_DATA, RAM in the E820 map; each boot has new bytes."""
    blob = make_elf([(PADDR, b"\x90" * 64, 64)], entry=PADDR) if kind == "vmlinux" else make_bzimage(PAYLOAD)
    path = write_file(tmp_path, kind, blob)
    seeds = []
    for _ in range(2):
        mem = junk_memory()
        cfg = configure_boot(mem, load_image(mem, path, MEM), None, "", MEM, RSDP)
        zp = layout.ZERO_PAGE.base
        assert cfg.setup_data == layout.SETUP_DATA.base == mem.read_int(zp + 0x250, 8)
        [(addr, typ, length, seed)] = read_chain(mem, cfg.setup_data)
        assert (addr, typ, length) == (layout.SETUP_DATA.base, setup_data.SETUP_RNG_SEED, 32) and typ == 9
        assert untouched(mem, addr + 16 + 32, layout.SETUP_DATA.end - (addr + 16 + 32))
        seeds.append(seed)
    assert seeds[0] != seeds[1] and JUNK * 32 not in seeds
    ram = [e for e in layout.e820_map(MEM) if e.type == layout.E820_RAM]
    assert any(e.addr <= layout.SETUP_DATA.base and layout.SETUP_DATA.end <= e.end for e in ram)


def test_setup_data_chain_links_entries_in_order() -> None:
    mem = junk_memory()
    entries = [setup_data.SetupData(1, b"abc"), setup_data.SetupData(setup_data.SETUP_RNG_SEED, bytes(range(32)))]
    head = setup_data.write_setup_data(mem, entries)
    chain = read_chain(mem, head)
    assert [(t, n, d) for _, t, n, d in chain] == [(1, 3, b"abc"), (9, 32, bytes(range(32)))]
    assert chain[0][0] == layout.SETUP_DATA.base and chain[1][0] == layout.SETUP_DATA.base + 24  # 8-byte aligned
    assert setup_data.write_setup_data(mem, []) == 0
