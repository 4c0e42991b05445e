"""The x86 Linux boot protocol for a bzImage, 64-bit entry (Documentation/arch/x86/boot.rst).

Step 1, `load_bzimage`: the protected-mode kernel (everything after the (setup_sects + 1) *
512 bytes of real-mode setup) is loaded at 1 MiB ("Loading The Rest of The Kernel").
Step 2, `configure_linux`: boot_params (the "zero page", arch/x86/include/uapi/asm/bootparam.h)
gets a copy of the file's setup header plus what a boot loader fills in ("Details of Header
Fields"), with the E820 map and setup_data; the vCPU enters `startup_64` at load address +
0x200 in long mode with an identity map, __BOOT_CS/__BOOT_DS and RSI = the zero page
("64-bit Boot Protocol"). A vmlinux takes the same step 2 with a synthesized header
(`vmlinux.py`).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from dataclasses import dataclass

from .. import layout
from ..errors import UserError
from ..memory import GuestMemory
from ..ranges import AddressRange
from .common import BootConfig, KernelLoaderResult, check_ram, load_initrd, write_cmdline
from .entry import CpuMode, Registers, setup_entry
from .setup_data import rng_seed, write_setup_data

SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG_MAGIC = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS"
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags and XLF_KERNEL_64
PROTOCOL_ACPI_RSDP = 0x020E  # 2.14: boot_params.acpi_rsdp_addr
STARTUP_64_OFFSET = 0x200
SECTOR_SIZE = 512
DEFAULT_SETUP_SECTS = 4  # setup_sects == 0 means 4
TYPE_OF_LOADER_UNDEFINED = 0xFF

# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

# struct boot_params offsets (bootparam.h).
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0
BOOT_PARAMS_SIZE = 4096


@dataclass
class SetupHeader:
    """struct setup_header (boot.rst, "The Real-Mode Kernel Header"), at file offset 0x1F1."""

    setup_sects: int
    root_flags: int
    syssize: int
    ram_size: int
    vid_mode: int
    root_dev: int
    boot_flag: int
    jump: int
    header: int
    version: int
    realmode_swtch: int
    start_sys_seg: int
    kernel_version: int
    type_of_loader: int
    loadflags: int
    setup_move_size: int
    code32_start: int
    ramdisk_image: int
    ramdisk_size: int
    bootsect_kludge: int
    heap_end_ptr: int
    ext_loader_ver: int
    ext_loader_type: int
    cmd_line_ptr: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: int
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    hardware_subarch: int
    hardware_subarch_data: int
    payload_offset: int
    payload_length: int
    setup_data: int
    pref_address: int
    init_size: int
    handover_offset: int
    kernel_info_offset: int

    FORMAT = struct.Struct("<BHIHHHHHIHIHHBBHIIIIHBBIIIBBHIIQIIQQIII")  # 0x1F1..0x26B

    @classmethod
    def unpack(cls, raw: bytes) -> SetupHeader:
        return cls(*cls.FORMAT.unpack(raw[: cls.FORMAT.size].ljust(cls.FORMAT.size, b"\0")))

    def pack(self) -> bytes:
        return self.FORMAT.pack(*dataclasses.astuple(self))

    @staticmethod
    def length(image: bytes) -> int:
        """Bytes of header present in the file: it ends at 0x202 + the jump offset byte at 0x201."""
        return 0x202 + image[0x201] - SETUP_HEADER_OFFSET


assert SetupHeader.FORMAT.size == 0x26C - SETUP_HEADER_OFFSET


def is_bzimage(data: bytes) -> bool:
    return len(data) >= 0x206 and struct.unpack_from("<I", data, 0x202)[0] == HDRS_MAGIC


def parse_setup_header(path: str, data: bytes) -> tuple[SetupHeader, int]:
    """Check the header; returns (header, size of the real-mode setup in the file)."""
    if len(data) < 0x270:
        raise UserError(f"kernel {path}: truncated bzImage ({len(data)} bytes)")
    hdr_len = SetupHeader.length(data)
    hdr = SetupHeader.unpack(data[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + hdr_len])
    if hdr.boot_flag != BOOT_FLAG_MAGIC or hdr.header != HDRS_MAGIC:
        raise UserError(f"kernel {path}: not a bzImage (no 0xAA55 boot flag and \"HdrS\" header)")
    if hdr.version < MIN_PROTOCOL:
        raise UserError(
            f"kernel {path}: boot protocol {hdr.version >> 8}.{hdr.version & 0xFF:02d} is too old; "
            "the 64-bit entry needs 2.12 or later"
        )
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise UserError(f"kernel {path}: bzImage has no 64-bit entry point (XLF_KERNEL_64 clear); is it a 32-bit kernel?")
    if not hdr.loadflags & LOADED_HIGH:
        raise UserError(f"kernel {path}: zImage (loaded low) is not supported; use a bzImage")
    setup_sects = hdr.setup_sects or DEFAULT_SETUP_SECTS
    setup_size = (setup_sects + 1) * SECTOR_SIZE
    if len(data) < setup_size + hdr.syssize * 16:
        raise UserError(
            f"kernel {path}: truncated bzImage: {len(data)} bytes, the header says "
            f"{setup_size + hdr.syssize * 16} (setup {setup_size} + kernel {hdr.syssize * 16})"
        )
    return hdr, setup_size


def runtime_start(hdr: SetupHeader, load_address: int) -> int:
    """Where the kernel runs (boot.rst, init_size): relocatable kernels move up to
    pref_address, aligned to kernel_alignment; others run at pref_address."""
    if hdr.relocatable_kernel:
        load_address = max(load_address, hdr.pref_address)
        return layout.align_up(load_address, max(hdr.kernel_alignment, 1))
    return hdr.pref_address


def describe_header(hdr: SetupHeader, load_address: int) -> str:
    """One line for --trace: protocol version, runtime start, init_size."""
    run = runtime_start(hdr, load_address)
    return f"bzImage protocol {hdr.version >> 8}.{hdr.version & 0xFF:02d}, runs at {run:#x}, init_size {hdr.init_size:#x}"


def load_bzimage(mem: GuestMemory, kernel_path: str | os.PathLike[str], data: bytes, mem_size: int) -> KernelLoaderResult:
    """Step 1: check the setup header and copy the protected-mode kernel to 1 MiB in guest
    RAM laid out for `mem_size`; the kernel then needs init_size bytes at its runtime start
    address before it looks at the memory map (boot.rst, init_size)."""
    path = os.fspath(kernel_path)
    hdr, setup_size = parse_setup_header(path, data)
    low_top = layout.low_ram_top(mem_size)
    kernel = data[setup_size:]
    load = layout.HIGH_MEMORY
    run = runtime_start(hdr, load)
    kernel_end = max(load + len(kernel), run + hdr.init_size)
    if kernel_end > low_top:
        raise UserError(
            f"kernel {path}: needs guest RAM up to {kernel_end:#x} (loaded at {load:#x}, "
            f"{hdr.init_size:#x} bytes from {run:#x} to decompress) but RAM ends at {low_top:#x}; "
            "give the guest more memory"
        )
    check_ram(mem, load, kernel_end - load, f"kernel {path}")
    mem.write(load, kernel)
    hdr_len = SetupHeader.length(data)
    return KernelLoaderResult(
        kernel=AddressRange(load, len(kernel)),
        kernel_end=kernel_end,
        entry=load + STARTUP_64_OFFSET,
        setup_header=hdr,
        setup_header_bytes=data[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + hdr_len],
    )


def boot_params(
    hdr: SetupHeader,
    raw_header: bytes,
    cmdline: AddressRange,
    initrd: AddressRange | None,
    mem_size: int,
    rsdp_addr: int,
    setup_data: int = 0,
) -> bytes:
    """struct boot_params (bootparam.h): zeroed, then the header as found in the file, then the
    fields a boot loader fills in (boot.rst, "Details of Header Fields": type_of_loader,
    loadflags, heap_end_ptr, cmd_line_ptr, ramdisk_image/size and their ext_ high halves,
    setup_data), the E820 table and, from protocol 2.14, acpi_rsdp_addr."""
    ramdisk_image, ramdisk_size = (initrd.base, initrd.size) if initrd is not None else (0, 0)
    bp = bytearray(BOOT_PARAMS_SIZE)
    bp[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(raw_header)] = raw_header
    fields = dataclasses.replace(
        hdr,
        type_of_loader=TYPE_OF_LOADER_UNDEFINED,
        loadflags=(hdr.loadflags | LOADED_HIGH | CAN_USE_HEAP) & ~KEEP_SEGMENTS,
        heap_end_ptr=layout.SETUP_HEAP_END - 0x200,
        cmd_line_ptr=cmdline.base & 0xFFFFFFFF,
        ramdisk_image=ramdisk_image & 0xFFFFFFFF,
        ramdisk_size=ramdisk_size & 0xFFFFFFFF,
        setup_data=setup_data,
    )
    packed = fields.pack()[: len(raw_header)]  # only the fields the file's header has
    bp[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(packed)] = packed
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, cmdline.base >> 32)
    struct.pack_into("<II", bp, BP_EXT_RAMDISK_IMAGE, ramdisk_image >> 32, ramdisk_size >> 32)
    e820 = layout.e820_map(mem_size)
    assert len(e820) <= layout.E820_MAX_ENTRIES_ZEROPAGE
    bp[BP_E820_ENTRIES] = len(e820)
    table = b"".join(e.pack() for e in e820)
    bp[BP_E820_TABLE : BP_E820_TABLE + len(table)] = table
    if hdr.version >= PROTOCOL_ACPI_RSDP:
        struct.pack_into("<Q", bp, BP_ACPI_RSDP_ADDR, rsdp_addr)
    return bytes(bp)


def configure_linux(
    mem: GuestMemory,
    loaded: KernelLoaderResult,
    cmdline: bytes,
    initrd_path: str | os.PathLike[str] | None,
    mem_size: int,
    rsdp_addr: int,
) -> BootConfig:
    """Step 2, for a bzImage or a vmlinux (`vmlinux.py`): the command line (at most
    cmdline_size bytes), the initrd (below initrd_addr_max), setup_data (a fresh RNG seed,
    `setup_data.py`), the zero page, then the LONG64 entry at `loaded.entry` with RSI = the
    zero page (boot.rst, "64-bit Boot Protocol")."""
    hdr = loaded.setup_header
    if hdr is None:
        raise ValueError("configure_linux needs a setup header (a bzImage's or a vmlinux's KernelLoaderResult)")
    cmd = write_cmdline(mem, cmdline, hdr.cmdline_size)
    initrd = None
    if initrd_path is not None:
        top = min(layout.low_ram_top(mem_size), hdr.initrd_addr_max + 1)
        initrd = load_initrd(mem, initrd_path, loaded.kernel_end, top)
    setup_data = write_setup_data(mem, [rng_seed()])
    zero_page = layout.ZERO_PAGE.base
    mem.write(zero_page, boot_params(hdr, loaded.setup_header_bytes, cmd, initrd, mem_size, rsdp_addr, setup_data))
    entry = setup_entry(mem, CpuMode.LONG64, Registers(rip=loaded.entry, rsi=zero_page))
    return BootConfig(loaded.protocol, cmd, initrd, zero_page, rsdp_addr, entry, setup_data)
