"""Kernel loading in two steps, as rust-vmm's linux-loader does.

1. LOAD (`load_image`): detect the format and write the image into guest memory. An ELF
   file (`\\x7fELF`) is a vmlinux, booted with the Linux 64-bit boot protocol and a setup
   header minivmm writes (`vmlinux.load_vmlinux`, the default) or through its PVH entry note
   (`pvh.load_elf`, `boot=BootProtocol.PVH`); anything with the "HdrS" setup header is a
   bzImage (`bzimage.load_bzimage`). Returns a `KernelLoaderResult`.
2. CONFIGURE (`configure_boot`): the boot protocol the image asks for: command line, initrd,
   PVH `hvm_start_info` (`pvh.configure_pvh`) or the `boot_params` zero page with its
   setup_data (`bzimage.configure_linux`), and the entry state built from the protocol's `CpuMode`
   (`entry.setup_entry`). Returns a `BootConfig` whose `entry` the machine copies into the
   boot vCPU (`minivmm.vcpu_setup.apply_entry`).

`load_kernel` does both for the machine.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .. import layout
from ..errors import UserError
from ..memory import GuestMemory
from .acpi import build_acpi, write_acpi_tables
from .bzimage import configure_linux, describe_header, is_bzimage, load_bzimage
from .common import BootConfig, BootProtocol, KernelLoaderResult, encode_cmdline, kernel_is_smp, read_file
from .entry import BootEntry, CpuMode, Registers, Segment
from .elf import is_elf
from .pvh import configure_pvh, load_elf
from .vmlinux import load_vmlinux

__all__ = [
    "BOOT_CHOICES",
    "Boot",
    "BootConfig",
    "BootEntry",
    "BootProtocol",
    "CpuMode",
    "KernelLoaderResult",
    "Registers",
    "Segment",
    "build_acpi",
    "configure_boot",
    "load_image",
    "load_kernel",
    "write_acpi_tables",
]


@dataclass(frozen=True)
class Boot:
    """Both steps' results: where the kernel went (`loaded`) and how it is entered (`config`)."""

    loaded: KernelLoaderResult
    config: BootConfig

    @property
    def entry(self) -> BootEntry:
        return self.config.entry

    def describe(self) -> list[str]:
        """Human-readable lines for --trace."""
        kernel, cfg = self.loaded.kernel, self.config
        first, second = cfg.entry.describe()
        lines = [
            f"boot: {cfg.protocol.value} {first}",
            f"boot: {second}",
            f"boot: kernel {kernel.base:#x}-{kernel.end - 1:#x} ({kernel.size} bytes)",
            f"boot: cmdline at {cfg.cmdline.base:#x} ({cfg.cmdline.size - 1} bytes), boot info at {cfg.boot_info:#x}, RSDP at {cfg.rsdp_addr:#x}",
        ]
        if cfg.setup_data:
            lines.append(f"boot: setup_data at {cfg.setup_data:#x} (RNG seed)")
        if cfg.initrd is not None:
            lines.append(f"boot: initrd {cfg.initrd.base:#x}-{cfg.initrd.end - 1:#x} ({cfg.initrd.size} bytes)")
        if self.loaded.setup_header is not None:
            lines.append(f"boot: {describe_header(self.loaded.setup_header, kernel.base)}")
        return lines


BOOT_CHOICES = (BootProtocol.LINUX, BootProtocol.PVH)  # what a user picks (--boot)


def load_image(
    mem: GuestMemory, kernel_path: str | os.PathLike[str], mem_size: int, boot: BootProtocol = BootProtocol.LINUX
) -> KernelLoaderResult:
    """Step 1: load `kernel_path` (an ELF vmlinux or a bzImage) into `mem` (guest RAM laid out
    by `layout.ram_ranges(mem_size)`), for `boot` (one of `BOOT_CHOICES`; a bzImage is only
    booted with LINUX). Problems are `UserError`s naming the file."""
    layout.check_mem_size(mem_size)
    if boot not in BOOT_CHOICES:
        raise ValueError(f"boot protocol {boot} is not one of {BOOT_CHOICES}")
    data = read_file(kernel_path, "kernel")
    if is_elf(data):
        load = load_elf if boot is BootProtocol.PVH else load_vmlinux
    elif is_bzimage(data):
        if boot is BootProtocol.PVH:
            raise UserError(f"kernel {os.fspath(kernel_path)}: a bzImage has no PVH entry; boot it with --boot linux")
        load = load_bzimage
    else:
        raise UserError(f"kernel {os.fspath(kernel_path)}: not an ELF vmlinux or a bzImage (unknown format)")
    return dataclasses.replace(load(mem, kernel_path, data, mem_size), smp=kernel_is_smp(data))


def configure_boot(
    mem: GuestMemory,
    loaded: KernelLoaderResult,
    initrd_path: str | os.PathLike[str] | None,
    cmdline: str | bytes,
    mem_size: int,
    rsdp_addr: int,
) -> BootConfig:
    """Step 2: write the command line, the initrd (if given) and the boot information of the
    protocol `loaded` asks for, and build the entry state."""
    cmd = encode_cmdline(cmdline)
    configure = configure_pvh if loaded.protocol is BootProtocol.PVH else configure_linux
    return configure(mem, loaded, cmd, initrd_path, mem_size, rsdp_addr)


def load_kernel(
    mem: GuestMemory,
    kernel_path: str | os.PathLike[str],
    initrd_path: str | os.PathLike[str] | None,
    cmdline: str | bytes,
    mem_size: int,
    rsdp_addr: int,
    boot: BootProtocol = BootProtocol.LINUX,
) -> Boot:
    """Both steps: `load_image` for `boot`, then `configure_boot`."""
    loaded = load_image(mem, kernel_path, mem_size, boot)
    return Boot(loaded, configure_boot(mem, loaded, initrd_path, cmdline, mem_size, rsdp_addr))
