"""Run in a private mount namespace by tests/test_pmem_fault.py: a tiny long-mode guest whose
pmem-like region (a memory slot mapping a sparse backing file) is written page by page, past
what the file's filesystem can hold (a small tmpfs) or past the file's end (truncated by
someone after it was mapped). Prints one JSON object: how the run stopped and what the
region's owner was told.

    python unbacked_guest.py DIR full|truncated
"""

from __future__ import annotations

import json
import mmap
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tinyguest

from tinyguest import Asm, TinyGuest  # noqa: E402

from minivmm.memory import Region  # noqa: E402
from minivmm.vcpu import install_kick_handler  # noqa: E402

MiB = 1 << 20
FILE_SIZE = 64 * MiB
PMEM_GPA = 0x4000_0000  # 1 GiB: inside the entry's identity map, clear of the tiny guest's RAM
PATTERN = 0x5A
TRUNCATED_TO = 2 * MiB


def page_writer(start: int, end: int) -> Asm:
    """Store PATTERN in the first byte of every 4 KiB page of [start, end), then `done`."""
    a = Asm(64).mov_acc_imm(1, PATTERN)
    a.emit(0x48, 0xBF, start.to_bytes(8, "little"))  # mov rdi, start
    a.emit(0x88, 0x07)  # loop: mov [rdi], al
    a.emit(0x48, 0x81, 0xC7, (0x1000).to_bytes(4, "little"))  # add rdi, 0x1000
    a.emit(0x48, 0x81, 0xFF, end.to_bytes(4, "little"))  # cmp rdi, end (imm32, sign-extended)
    a.emit(0x72, (-18) & 0xFF)  # jb loop (back over the 18 bytes above)
    return a.done()


def main(directory: str, mode: str) -> None:
    install_kick_handler()
    path = os.path.join(directory, "pmem.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, FILE_SIZE)  # sparse, as --pmem creates it
    mapping = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    faults: list[str] = []
    guest = TinyGuest(long_mode=True)
    region = guest.mem.add_region(Region(PMEM_GPA, FILE_SIZE, mapping, "pmem0", file=path, on_fault=faults.append))
    guest.vm.map_memory(1, region.gpa, region.mapping, region.size)
    if mode == "truncated":
        os.ftruncate(fd, TRUNCATED_TO)  # someone cuts the file while the guest has it mapped
    stop = guest.run(page_writer(PMEM_GPA, PMEM_GPA + FILE_SIZE), timeout=60)
    written = sum(1 for off in range(0, os.fstat(fd).st_size, 4096) if os.pread(fd, 1, off) == bytes([PATTERN]))
    vfs = os.statvfs(directory)
    print(json.dumps({
        "status": stop.status,
        "reason": stop.reason,
        "faults": faults,
        "pages_written": written,
        "free": vfs.f_bavail * vfs.f_frsize,
        "unclaimed": dict(guest.mmio.unclaimed),
    }))  # fmt: skip
    guest.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
