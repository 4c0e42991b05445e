"""Loading the real default guest kernel (vmlinux through the Linux 64-bit protocol and
through PVH, bzImage through the 64-bit protocol), checked against what pyelftools and the
raw header say independently."""

from __future__ import annotations

import struct

import pytest
from elftools.elf.elffile import ELFFile

from minivmm import layout
from minivmm.boot import BootProtocol, CpuMode, acpi, bzimage, load_kernel, pvh, setup_data
from minivmm.memory import GuestMemory

MEM = 256 * layout.MiB


@pytest.fixture
def mem():
    m = GuestMemory.anonymous(MEM)
    return m


def test_vmlinux_pvh(guest_kernel_dir, mem):
    path = guest_kernel_dir / "vmlinux"
    rsdp = acpi.build_acpi(mem, 1, MEM)
    boot = load_kernel(mem, path, None, "console=ttyS0", MEM, rsdp, BootProtocol.PVH)
    entry = boot.entry
    with open(path, "rb") as f:
        elf = ELFFile(f)
        phys32, loads = [], 0
        for seg in elf.iter_segments():
            if seg.header.p_type == "PT_LOAD":
                loads += 1
                data = seg.data()
                assert mem.read(seg.header.p_paddr, len(data)) == data
                tail = seg.header.p_memsz - seg.header.p_filesz
                if tail:
                    assert not any(mem.read(seg.header.p_paddr + seg.header.p_filesz, tail))
            elif seg.header.p_type == "PT_NOTE":
                for note in seg.iter_notes():
                    if note["n_name"] == "Xen" and note["n_type"] == pvh.XEN_ELFNOTE_PHYS32_ENTRY:
                        phys32.append(int.from_bytes(note["n_descdata"], "little"))
    assert loads > 0 and entry.regs.rip in phys32
    assert entry.mode is CpuMode.PROTECTED32 and entry.regs.rbx == layout.PVH_START_INFO.base
    magic, version, *_ = mem.read_struct(entry.regs.rbx, pvh.HVM_START_INFO)
    assert (magic, version) == (pvh.XEN_HVM_START_MAGIC_VALUE, 1)
    assert boot.loaded.kernel.base >= layout.HIGH_MEMORY and boot.loaded.kernel.end <= MEM


def test_vmlinux_linux_64bit_protocol(guest_kernel_dir, mem):
    """The default: startup_64 at e_entry (phys_startup_64, physical), RSI = boot_params with
    the synthesized header, the RSDP and the RNG seed's setup_data."""
    path = guest_kernel_dir / "vmlinux"
    rsdp = acpi.build_acpi(mem, 1, MEM)
    boot = load_kernel(mem, path, None, "console=ttyS0", MEM, rsdp)
    with open(path, "rb") as f:
        elf = ELFFile(f)
        e_entry = elf.header.e_entry
        first = next(s for s in elf.iter_segments() if s.header.p_type == "PT_LOAD")
        assert mem.read(first.header.p_paddr, 4096) == first.data()[:4096]
    entry, zp = boot.entry, layout.ZERO_PAGE.base
    assert boot.config.protocol is BootProtocol.LINUX and entry.mode is CpuMode.LONG64
    assert entry.regs.rip == e_entry == first.header.p_paddr and entry.regs.rsi == zp
    assert mem.read_int(zp + 0x1FE, 2) == 0xAA55 and mem.read(zp + 0x202, 4) == b"HdrS"
    assert mem.read_int(zp + 0x206, 2) >= bzimage.PROTOCOL_ACPI_RSDP and mem.read_int(zp + bzimage.BP_ACPI_RSDP_ADDR, 8) == rsdp
    assert mem.read_int(zp + 0x210, 1) == 0xFF  # type_of_loader: nonzero, or the kernel ignores an initrd
    assert mem.read_int(zp + 0x250, 8) == layout.SETUP_DATA.base
    assert mem.read_struct(layout.SETUP_DATA.base, setup_data.SETUP_DATA_HEADER) == (0, setup_data.SETUP_RNG_SEED, 32)


def test_bzimage(guest_kernel_dir, mem, tmp_path):
    path = guest_kernel_dir / "bzImage"
    raw = path.read_bytes()
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x07" * 100_000)
    boot = load_kernel(mem, path, initrd, "console=ttyS0", MEM, 0xE0000)
    entry, initrd_range = boot.entry, boot.config.initrd
    assert initrd_range is not None
    setup_sects = raw[0x1F1] or 4
    setup = (setup_sects + 1) * 512
    assert mem.read(layout.HIGH_MEMORY, len(raw) - setup) == raw[setup:]
    zp = layout.ZERO_PAGE.base
    version = struct.unpack_from("<H", raw, 0x206)[0]
    assert mem.read_int(zp + 0x206, 2) == version >= 0x020C
    assert mem.read_int(zp + 0x210, 1) == 0xFF
    assert entry.regs.rip == layout.HIGH_MEMORY + 0x200 and entry.regs.rsi == zp and entry.mode is CpuMode.LONG64
    init_size = struct.unpack_from("<I", raw, 0x260)[0]
    pref = struct.unpack_from("<Q", raw, 0x258)[0]
    assert initrd_range.base >= max(pref, layout.HIGH_MEMORY) + init_size
    assert initrd_range.end <= struct.unpack_from("<I", raw, 0x22C)[0] + 1
    hdr = bzimage.SetupHeader.unpack(mem.read(zp + 0x1F1, bzimage.SetupHeader.FORMAT.size))
    assert hdr.ramdisk_image == initrd_range.base and hdr.cmd_line_ptr == layout.CMDLINE.base


def test_kernel_is_smp_reads_the_version_string():
    """The default guest's SMP kernel says SMP in its version string, its uniprocessor kernel
    does not, in the vmlinux banner and the bzImage setup code alike."""
    from minivmm.boot.common import kernel_is_smp
    from minivmm.guestmanifest import default_guest

    guest = default_guest()
    for kind, smp in (("vmlinux", True), ("bzImage", True), ("vmlinux-up", False), ("bzImage-up", False)):
        path = guest.kernel(kind)
        assert path is not None, f"the default guest has no {kind}: rebuild it (make guest)"
        assert kernel_is_smp(path.read_bytes()) is smp, kind
    assert kernel_is_smp(b"\x7fELF no version string") is None



def test_load_image_tells_whether_the_kernel_is_smp(mem):
    """`load_image` reports the image's CONFIG_SMP from the bytes it loaded (the machine picks
    the software-KVM boot remedies by it)."""
    from minivmm.boot import load_image
    from minivmm.guestmanifest import default_guest

    guest = default_guest()
    assert load_image(mem, guest.kernel("vmlinux"), MEM).smp is True
    assert load_image(mem, guest.kernel("vmlinux-up"), MEM).smp is False
    assert load_image(mem, guest.kernel("bzImage-up"), MEM).smp is False
