"""Guest accesses the host cannot back (issue 9, item 2): a sparse pmem file on a full
filesystem, a backing file truncated under the guest. Such an access must stop the run with
status 1 and one line naming the region, the file, the offset and the likely cause, and tell
the region's owner (so no later flush reports success) — never be dropped as an "unclaimed"
MMIO write.

On kvm_pvm the access arrives as an MMIO exit inside a memory slot; on hardware KVM,
`KVM_RUN` fails with EFAULT (`MemoryFaultExit`, with the page when KVM_EXIT_MEMORY_FAULT
names it). Both forms are handed to the handler at a stopped vCPU here, and a real tiny guest
writes into a real full tmpfs (in a private mount namespace) and a real truncated file.
"""

# ruff: noqa: F811  (test functions take the imported fixtures as parameters)
from __future__ import annotations

import errno
import io
import json
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from minivmm import kvm
from minivmm.exit_handler import ExitParts, handle_exit
from minivmm.memory import Region
from minivmm.vcpu_exit import MemoryFaultExit, MmioExit
from tinyguest import kick_handler, make_guest  # noqa: F401  (pytest fixtures, used by name)

MiB = 1 << 20
PMEM_GPA = 0x4000_0000
HELPER = Path(__file__).parent / "support" / "unbacked_guest.py"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def with_file(make_guest, tmp_path):
    """(guest, parts, region, faults): a stopped long-mode tiny guest plus a 4 MiB file-backed
    region "pmem0" at PMEM_GPA whose faults are collected."""
    g = make_guest(long_mode=True)
    path = tmp_path / "pmem.img"
    path.write_bytes(bytes(4 * MiB))
    with open(path, "r+b") as f:
        mapping = mmap.mmap(f.fileno(), 4 * MiB)
    faults: list[str] = []
    region = g.mem.add_region(Region(PMEM_GPA, 4 * MiB, mapping, "pmem0", file=str(path), on_fault=faults.append))
    parts = ExitParts(g.vcpu, g.mem, g.pio, g.mmio, g.loop.fallbacks, diagnostics=io.StringIO())
    yield g, parts, region, faults
    region.view.release()
    mapping.close()


def test_mmio_exit_inside_a_file_region_stops_with_one_line(with_file) -> None:
    g, parts, region, faults = with_file
    os.truncate(region.file, 1 * MiB)  # someone cut the file under the guest
    stop = handle_exit(MmioExit(PMEM_GPA + 0x123000, 8, True, memoryview(bytearray(8))), parts)
    assert stop is not None and stop.status == 1
    assert stop.reason == (
        f"pmem0: a guest 8-byte write at {PMEM_GPA + 0x123000:#x} could not be backed by the host: "
        f"file {region.file} offset 0x123000: the file was truncated by someone (it is 1M long now)"
    )
    assert "\n" not in stop.reason
    assert faults == [stop.reason]  # the owner knows: its flushes must fail from now on
    assert parts.by_device == {} and not g.mmio.unclaimed  # not counted as an unclaimed write
    assert parts.diagnostics.getvalue() == ""  # one line, no register dump: not a guest bug


def test_mmio_read_inside_a_file_region_is_not_answered_with_all_ones(with_file) -> None:
    g, parts, region, faults = with_file
    data = memoryview(bytearray(4))
    stop = handle_exit(MmioExit(PMEM_GPA + 0x2000, 4, False, data), parts)
    assert stop is not None and stop.status == 1
    assert re.fullmatch(rf"pmem0: a guest 4-byte read at {PMEM_GPA + 0x2000:#x} .* file {re.escape(region.file)} offset 0x2000: .*", stop.reason)
    assert bytes(data) == bytes(4) and faults == [stop.reason]


def test_mmio_exit_inside_ram_names_the_host_memory(with_file) -> None:
    g, parts, region, faults = with_file
    stop = handle_exit(MmioExit(0x1000, 1, True, memoryview(bytearray(1))), parts)
    assert stop is not None and stop.status == 1
    assert stop.reason.startswith("ram: a guest 1-byte write at 0x1000 could not be backed by the host")
    assert "out of memory" in stop.reason and faults == []


def test_mmio_exit_outside_memory_still_goes_to_the_bus(with_file) -> None:
    g, parts, region, faults = with_file
    assert handle_exit(MmioExit(PMEM_GPA + 4 * MiB, 4, True, memoryview(bytearray(4))), parts) is None
    assert g.mmio.unclaimed["write"] == 1 and faults == []


def test_efault_with_the_page_named(with_file) -> None:
    g, parts, region, faults = with_file
    stop = handle_exit(MemoryFaultExit(PMEM_GPA + 0x5000, 0x1000), parts)
    assert stop is not None and stop.status == 1
    assert stop.reason.startswith(f"pmem0: a guest 4096-byte access at {PMEM_GPA + 0x5000:#x} could not be backed")
    assert f"file {region.file} offset 0x5000: " in stop.reason and faults == [stop.reason]


def test_plain_efault_suspects_every_file(with_file) -> None:
    g, parts, region, faults = with_file
    os.truncate(region.file, 2 * MiB)
    stop = handle_exit(MemoryFaultExit(), parts)
    assert stop is not None and stop.status == 1 and "\n" not in stop.reason
    assert stop.reason == (
        "KVM_RUN failed with EFAULT: a guest page could not be backed by the host; "
        f"pmem0 (file {region.file}): the file was truncated by someone (it is 2M long now)"
    )
    assert faults == [stop.reason]


def test_memory_fault_decoded_from_kvm_run(make_guest) -> None:
    """The EFAULT decoding reads kvm_run.memory_fault only when KVM set KVM_EXIT_MEMORY_FAULT."""
    g = make_guest(long_mode=True)
    run = g.vcpu.kvm_run
    run.exit_reason = kvm.KVM_EXIT_MEMORY_FAULT
    union = kvm.ffi.offsetof("struct kvm_run", "hw")  # linux/kvm.h: memory_fault {flags, gpa, size}
    struct.pack_into("<QQQ", g.vcpu.run_map, union, 0, 0x4000_1000, 0x1000)
    assert g.vcpu.memory_fault() == MemoryFaultExit(0x4000_1000, 0x1000, 0)
    run.exit_reason = kvm.KVM_EXIT_MMIO  # stale: a plain EFAULT names no page
    assert g.vcpu.memory_fault() == MemoryFaultExit()


# -- real guests, real files -----------------------------------------------------------------------
def run_helper(argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"{argv}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout.splitlines()[-1])


def check_stopped(result: dict, cause: str) -> int | None:
    """Status 1, one line naming pmem0, its file and `cause`; the offset (when the page is
    known) is the first page that was not written. Returns that offset."""
    reason = result["reason"]
    assert result["status"] == 1, result
    assert "\n" not in reason and "pmem0" in reason and "pmem.img" in reason, result
    assert re.search(cause, reason), result
    assert result["faults"] == [reason] and result["unclaimed"] == {}, result
    m = re.search(r" offset (0x[0-9a-f]+): ", reason)
    if m is None:  # hardware KVM without KVM_EXIT_MEMORY_FAULT: no page named
        assert reason.startswith("KVM_RUN failed with EFAULT"), result
        return None
    offset = int(m.group(1), 16)
    assert offset == result["pages_written"] * 4096, result  # every earlier page landed
    return offset


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare(1) and root for a private tmpfs")
def test_real_guest_fills_a_small_tmpfs(tmp_path) -> None:
    """A sparse 64 MiB file on an 8 MiB tmpfs, written page by page by a real guest."""
    script = f'mount -t tmpfs -o size=8m tmpfs "$1" && exec "{sys.executable}" "{HELPER}" "$1" full'
    result = run_helper(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(tmp_path)])
    offset = check_stopped(result, r"filesystem is full \(0 free\) and the file is sparse; prealloc=on")
    assert result["free"] == 0
    if offset is not None:
        assert offset == 8 * MiB  # what an 8 MiB tmpfs holds
    assert not any(tmp_path.iterdir())  # the tmpfs lived in the namespace only


def test_real_guest_writes_past_a_truncated_file(tmp_path) -> None:
    result = run_helper([sys.executable, str(HELPER), str(tmp_path), "truncated"])
    offset = check_stopped(result, r"the file was truncated by someone \(it is 2M long now\)")
    if offset is not None:
        assert offset == 2 * MiB


# -- the whole product: `minivmm run --pmem` on a full filesystem --------------------------------
def fill_pmem_kernel(mem_size: int, pages: int) -> bytes:
    """A synthetic bzImage whose 64-bit code maps the first pmem region (2 MiB pages, through
    a page directory of its own hung off the boot PDPT) and stores a byte into each of its
    first `pages` 4 KiB pages; should it get through, it powers off (status 0)."""
    from support.synthetic_kernels import make_bzimage, smoke_code
    from tinyguest import Asm

    from minivmm import layout

    base = layout.pmem_base(layout.ram_top(mem_size))
    pd = 0x40_0000  # free RAM past the kernel at 1 MiB
    a = Asm(64)
    for i in range(-(-pages * 4096 // (2 << 20))):
        a.mov_acc_imm(8, (base + i * (2 << 20)) | 0x83).store_acc(pd + 8 * i, 8)  # present, RW, 2 MiB
    a.mov_acc_imm(8, pd | 0x3).store_acc(layout.PDPT_ADDR + 8 * (base >> 30), 8)  # present, RW
    a.emit(0x48, 0xBF, base.to_bytes(8, "little"))  # mov rdi, base
    a.emit(0xB9, pages.to_bytes(4, "little"))  # mov ecx, pages
    a.mov_acc_imm(1, 0x5A)
    a.emit(0x88, 0x07)  # loop: mov [rdi], al
    a.emit(0x48, 0x81, 0xC7, (0x1000).to_bytes(4, "little"))  # add rdi, 0x1000
    a.emit(0xFF, 0xC9)  # dec ecx
    a.emit(0x75, (-13) & 0xFF)  # jnz loop
    assert base >> 30 < 512 and base % (1 << 30) == 0
    return make_bzimage(bytes(0x200) + bytes(a) + smoke_code(b"minivmm: wrote every page\n"))


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare(1) and root for a private tmpfs")
def test_minivmm_run_stops_when_the_pmem_filesystem_fills(tmp_path) -> None:
    """A 64 MiB sparse --pmem file on an 8 MiB tmpfs: a warning at start, then the guest's
    writes past 8 MiB stop the run with status 1 and one line naming the file and offset,
    instead of being dropped while the run ends with status 0."""
    kernel = tmp_path / "fill-kernel"
    kernel.write_bytes(fill_pmem_kernel(256 * MiB, pages=(10 * MiB) // 4096))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f'mount -t tmpfs -o size=8m tmpfs "$1" && exec "{sys.executable}" -m minivmm run --kernel "$2" --pmem "$1/p.img,size=64M"'
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(mnt), str(kernel)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    lines = proc.stderr.splitlines()
    diag = f"status {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 1, diag
    assert "wrote every page" not in proc.stdout, diag
    warnings = [line for line in lines if line.startswith("minivmm: warning:")]
    assert warnings == [
        f"minivmm: warning: --pmem {mnt}/p.img: 64M of the file is not allocated but its filesystem has only 8M free; "
        "guest writes may fail (prealloc=on allocates it up front)"
    ], diag
    path = re.escape(f"{mnt}/p.img")
    stop = re.compile(
        rf"minivmm: pmem0: a guest 1-byte write at 0x[0-9a-f]+ could not be backed by the host: file {path} offset 0x800000: "
        r"its filesystem is full \(0 free\) and the file is sparse; prealloc=on allocates it up front"
        rf"|minivmm: KVM_RUN failed with EFAULT.*pmem0 \(file {path}\): its filesystem is full.*"
    )
    assert stop.fullmatch(lines[-1]), diag
    assert not any(line.startswith("Traceback") for line in lines), diag


def test_machine_pmem_region_names_its_file_and_records_a_fault(tmp_path) -> None:
    """The machine gives each pmem region its backing file (for the line) and a fault hook
    that marks the device failed (`Machine.pmem_failures`), so a later flush can refuse."""
    from minivmm.machine import Machine, MachineConfig
    from minivmm.pmemfile import PmemSpec

    path = tmp_path / "p.img"
    config = MachineConfig(kernel=tmp_path / "unused", pmem=[PmemSpec(str(path), size=4 * MiB)])
    with Machine(config) as machine:
        region = next(r for r in machine.mem.regions if r.name == "pmem0")
        assert (region.file, region.file_offset, region.size) == (str(path), 0, 4 * MiB)
        parts = ExitParts(None, machine.mem, machine.pio, machine.mmio, machine.fallbacks, diagnostics=io.StringIO())  # type: ignore[arg-type]
        os.truncate(path, 2 * MiB)
        stop = handle_exit(MmioExit(region.gpa + 3 * MiB, 4, True, memoryview(bytearray(4))), parts)
        assert stop is not None and stop.status == 1
        assert machine.pmem_failures == {"pmem0": stop.reason}
        assert "the file was truncated by someone (it is 2M long now)" in stop.reason
        (device, _), = machine.pmem_plugged
        assert device.stats().flush_failed_errno == errno.EIO  # no later FLUSH can report success
