"""Tutorial step 5: booting Linux - the Linux boot protocol and PVH, and what the VMM put in memory.

Part 1 (no guest runs): load the default guest's two kernel images, the ELF vmlinux (through
both protocols) and the bzImage, into guest memory with the product's loader
(`minivmm.boot.load_kernel`) and compare the boot protocols. Part 2 (one boot): boot the
vmlinux (the default, the Linux 64-bit boot protocol) with `minivmm run --trace` and show the
memory map and boot entry it prints before the first KVM_RUN.

Run from a minivmm checkout, after `make guest`: PYTHONPATH=. .venv/bin/python examples/05_linux_boot.py
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from elftools.elf.elffile import ELFFile
from linux_boot import boot, init_lines

from minivmm import guestimage
from minivmm.boot import Boot, BootProtocol, load_kernel
from minivmm.boot.acpi import build_acpi
from minivmm.memory import GuestMemory

MEM = 256 << 20


def load(kernel: Path, protocol: BootProtocol = BootProtocol.LINUX) -> Boot:
    mem = GuestMemory.anonymous(MEM)
    return load_kernel(mem, kernel, guestimage.default_initrd(), "console=ttyS0", MEM, build_acpi(mem, 1, MEM), protocol)


def main() -> None:
    vmlinux, bzimage = guestimage.default_kernel("vmlinux"), guestimage.default_kernel("bzImage")
    assert vmlinux is not None and bzimage is not None, "build the default guest first: make guest"
    elf, pvh, linux = load(vmlinux), load(vmlinux, BootProtocol.PVH), load(bzimage)
    for name, b in (("vmlinux", elf), ("vmlinux --boot pvh", pvh), ("bzImage", linux)):
        cfg = b.config
        print(
            f"{name}: protocol {cfg.protocol.value}, enters in {cfg.entry.mode.value} mode, "
            f"kernel at {b.loaded.kernel.base:#x}, boot info at {cfg.boot_info:#x}, command line at {cfg.cmdline.base:#x}"
        )
    with open(vmlinux, "rb") as f:
        e_entry = ELFFile(f).header.e_entry  # Linux links it physical: phys_startup_64
    print(f"vmlinux entry = the ELF's entry point (startup_64): {elf.entry.regs.rip == e_entry}")
    print(f"bzImage entry = load address + 0x200 (startup_64): {linux.entry.regs.rip == linux.loaded.kernel.base + 0x200}")
    print(f"vmlinux and bzImage rsi = the zero page: {elf.entry.regs.rsi == elf.config.boot_info == linux.entry.regs.rsi}")
    print(f"vmlinux and bzImage setup_data (the RNG seed) at: {elf.config.setup_data:#x}, {linux.config.setup_data:#x}")
    print(f"vmlinux --boot pvh rbx = hvm_start_info: {pvh.entry.regs.rbx == pvh.config.boot_info}")

    with tempfile.TemporaryDirectory() as tmp:
        run = boot(Path(tmp), "hello", "--mem", "256M", "--trace")
    stderr = run.stderr.splitlines()
    print("--trace, before the first KVM_RUN:")
    for line in stderr:
        if line.startswith("map: "):
            print(" ", line)
    boot_line = next(line for line in stderr if line.startswith("boot: "))
    m = re.match(r"boot: (\S+) entry (\S+) rip=(0x[0-9a-f]+)", boot_line)
    assert m, boot_line
    print(f"  boot: {m.group(1)} entry {m.group(2)}, rip = the ELF's entry point: {int(m.group(3), 16) == elf.loaded.entry}")
    print("the guest's init said:", next(line for line in init_lines(run.stdout) if line.startswith("hello")))
    print("stop:", run.stop_reason)


if __name__ == "__main__":
    main()
