"""Tutorial step 7: why only flushed data survives.

One boot with two virtio-pmem devices. /dev/pmem0 shares its backing file (the default): the
guest's stores land in the host's page cache through the mapping, and a FLUSH makes the host
fdatasync the file, so they are on the disk. /dev/pmem1 has discard-writes=on: the mapping is
private (copy-on-write), the guest sees its own writes, but nothing it writes - flushed or
not - ever reaches the file, and its FLUSHes are answered without a host fdatasync.

The guest writes a token file on each and fsyncs it (pmem-write); after the run the host
reads both images with debugfs, without mounting them.

Run from a minivmm checkout, after `make guest`: PYTHONPATH=. .venv/bin/python examples/07_what_survives.py
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from linux_boot import boot, init_lines, make_ext4, read_file_in_ext4

TOKEN = "/minivmm-token"  # where pmem-write puts its token, in the file system's root
STEPS = "pmem-mount:pmem0,pmem-write:flushed-to-disk,umount,pmem-mount:pmem1,pmem-write:private-copy,pmem-read,umount"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shared, private = make_ext4(Path(tmp) / "shared.img"), make_ext4(Path(tmp) / "private.img")
        before = digest(private)
        run = boot(Path(tmp), STEPS, "--pmem", str(shared), "--pmem", f"{private},discard-writes=on")
        for line in init_lines(run.stdout):
            if line.startswith(("pmem-write", "pmem-read")):
                print("guest:", line)
        print(f"host reads shared.img: {TOKEN} = {read_file_in_ext4(shared, TOKEN)!r}")
        print(f"host reads private.img: {TOKEN} = {read_file_in_ext4(private, TOKEN)!r}")
        print("private.img unchanged:", digest(private) == before)
    shared_stats, private_stats = (p.counters for p in run.stats.pmem)
    print(f"pmem0 (shared): flush requests > 0: {shared_stats.flush_requests > 0}, host fdatasyncs > 0: {shared_stats.host_fsyncs > 0}")
    print(f"pmem1 (discard-writes=on): flush requests > 0: {private_stats.flush_requests > 0}, host fdatasyncs: {private_stats.host_fsyncs}")
    print("stop:", run.stop_reason)


if __name__ == "__main__":
    main()
