"""The Linux 64-bit boot protocol for an uncompressed ELF `vmlinux` (Documentation/arch/x86/
boot.rst, "64-bit Boot Protocol").

A bzImage carries a setup header for its boot loader; a vmlinux has none, but its entry point
`e_entry` is `startup_64`'s physical address (vmlinux.lds: ENTRY(phys_startup_64)), the very
code a bzImage's decompressor jumps to. So step 1, `load_vmlinux`, copies the PT_LOAD segments
(`elf.py`) and writes the setup header a boot loader would have read from a bzImage
(`setup_header`); step 2 is the bzImage's (`bzimage.configure_linux`): boot_params with that
header, the E820 map, the RSDP and setup_data, entered in long mode with RSI = the zero page.

Compared with PVH, this protocol hands the kernel setup_data (an RNG seed, `setup_data.py`),
and it needs no Xen note in the ELF.
"""

from __future__ import annotations

import os

from ..errors import UserError
from ..memory import GuestMemory
from .bzimage import (
    BOOT_FLAG_MAGIC,
    HDRS_MAGIC,
    LOADED_HIGH,
    TYPE_OF_LOADER_UNDEFINED,
    XLF_KERNEL_64,
    SetupHeader,
)
from .common import COMMAND_LINE_SIZE, BootProtocol, KernelLoaderResult
from .elf import ElfImage, check_entry, load_segments, parse_elf

# The header a 6.1 bzImage carries (arch/x86/boot/header.S): protocol 2.15. From 2.14 on the
# kernel takes acpi_rsdp_addr from boot_params; from 2.09 setup_data.
PROTOCOL_VERSION = 0x020F
INITRD_ADDR_MAX = 0x7FFFFFFF  # boot.rst, initrd_addr_max: the value before protocol 2.03
VID_MODE_NORMAL = 0xFFFF  # boot.rst, vid_mode: "normal" (the kernel has no VGA to set anyway)
KERNEL_ALIGNMENT = 0x200000  # CONFIG_PHYSICAL_ALIGN's x86-64 default; only read by relocators
MIN_ALIGNMENT_LG2 = 21  # log2(KERNEL_ALIGNMENT)


def physical_entry(path: str, image: ElfImage) -> int:
    """`e_entry` as a physical address: Linux links it physical (phys_startup_64); an entry
    given as a virtual address inside a segment is translated through that segment."""
    entry = image.e_entry
    for s in image.segments:
        if s.paddr <= entry < s.paddr + s.memsz:
            return entry
    for s in image.segments:
        if s.vaddr <= entry < s.vaddr + s.memsz:
            return s.paddr + entry - s.vaddr
    raise UserError(f"kernel {path}: ELF entry point {entry:#x} is outside the loaded image")


def setup_header(kernel_start: int, kernel_end: int) -> SetupHeader:
    """The setup header for a kernel loaded, unrelocated, at [kernel_start, kernel_end):
    the fields boot.rst marks as read by the kernel or the boot loader, set as a bzImage's
    would be; `boot_params` then fills in what the loader writes (type_of_loader,
    cmd_line_ptr, ramdisk_*, setup_data)."""
    return SetupHeader(
        setup_sects=0,
        root_flags=0,
        syssize=0,
        ram_size=0,
        vid_mode=VID_MODE_NORMAL,
        root_dev=0,
        boot_flag=BOOT_FLAG_MAGIC,
        jump=0,
        header=HDRS_MAGIC,
        version=PROTOCOL_VERSION,
        realmode_swtch=0,
        start_sys_seg=0,
        kernel_version=0,
        type_of_loader=TYPE_OF_LOADER_UNDEFINED,
        loadflags=LOADED_HIGH,
        setup_move_size=0,
        code32_start=kernel_start,
        ramdisk_image=0,
        ramdisk_size=0,
        bootsect_kludge=0,
        heap_end_ptr=0,
        ext_loader_ver=0,
        ext_loader_type=0,
        cmd_line_ptr=0,
        initrd_addr_max=INITRD_ADDR_MAX,
        kernel_alignment=KERNEL_ALIGNMENT,
        relocatable_kernel=0,  # loaded at its link address: nothing to relocate
        min_alignment=MIN_ALIGNMENT_LG2,
        xloadflags=XLF_KERNEL_64,
        cmdline_size=COMMAND_LINE_SIZE - 1,
        hardware_subarch=0,  # X86_SUBARCH_PC
        hardware_subarch_data=0,
        payload_offset=0,
        payload_length=0,
        setup_data=0,
        pref_address=kernel_start,
        init_size=kernel_end - kernel_start,
        handover_offset=0,
        kernel_info_offset=0,
    )


def load_vmlinux(mem: GuestMemory, kernel_path: str | os.PathLike[str], data: bytes, mem_size: int) -> KernelLoaderResult:
    """Step 1: copy the PT_LOAD segments of the ELF `data` to their physical addresses in
    guest RAM laid out for `mem_size`; the entry is startup_64 (`physical_entry`), the setup
    header synthesized (`setup_header`)."""
    path = os.fspath(kernel_path)
    image = parse_elf(path, data)
    entry = physical_entry(path, image)
    span = load_segments(mem, path, image, data, mem_size)
    check_entry(path, "ELF entry point", entry, span)
    hdr = setup_header(span.base, span.end)
    return KernelLoaderResult(
        kernel=span,
        kernel_end=span.end,
        entry=entry,
        setup_header=hdr,
        setup_header_bytes=hdr.pack(),
        protocol=BootProtocol.LINUX,
    )
