"""Helpers for the virtio-pmem boot tests (tests/test_pmem_boot.py).

Everything here works on real files in the test's tmp_path with the real host tools:
minivmm runs as a subprocess, ext4 images are made with ``mkfs.ext4`` and read or changed
with ``debugfs``/``dumpe2fs`` (never mounted on the host), and the test init is taken out of
the default initramfs with ``cpio``.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest
from support.runner import RunResult
from support.runner import run_minivmm as _run

from minivmm import guestimage
from minivmm.stats import PmemDeviceStats

BOOT_TIMEOUT = 900.0  # seconds per boot; ~3.5 min each on the software kvm_pvm host
TAIL_LINES = 60

MiB = 1 << 20

# guest/testinit/minivmm-test.c: TOKEN_FILE is MNT "/minivmm-token" with MNT "/mnt", and
# pmem-mount mounts the ext4 root directory on /mnt, so on the file system it is this path.
TOKEN_PATH_IN_FS = "/minivmm-token"
TEST_INIT_IN_INITRD = "sbin/minivmm-test"

# say() in minivmm-test.c: every line starts "minivmm-test: "; it goes to both /dev/kmsg and
# /dev/console, so with console=ttyS0 each appears twice (once behind a printk timestamp).
_INIT_LINE_RE = re.compile(r"minivmm-test: (.*?)\s*$")


# ---------------------------------------------------------------- the default guest


def default_guest() -> dict[str, Path]:
    """vmlinux, bzImage and initrd of the default guest; a missing one fails the test."""
    paths = {
        "vmlinux": guestimage.default_kernel("vmlinux"),
        "bzImage": guestimage.default_kernel("bzImage"),
        "initrd": guestimage.default_initrd(),
    }
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        pytest.fail(f"default guest not built ({', '.join(missing)} missing): run `make guest`")
    return paths  # type: ignore[return-value]


def extract_test_init(initrd: Path, workdir: Path) -> Path:
    """``cpio -i sbin/minivmm-test < initrd`` (gunzipped if need be) in ``workdir``; returns the file."""
    workdir.mkdir(parents=True, exist_ok=True)
    archive = guestimage.initramfs_archive(initrd)
    done = subprocess.run(
        ["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames", TEST_INIT_IN_INITRD],
        input=archive,
        cwd=workdir,
        capture_output=True,
        check=False,
    )
    out = workdir / TEST_INIT_IN_INITRD
    if done.returncode != 0 or not out.is_file():
        pytest.fail(f"cannot extract {TEST_INIT_IN_INITRD} from {initrd}: {done.stderr.decode(errors='replace')}")
    assert guestimage.is_static_elf(out), f"{out} is not a static executable"
    return out


# ---------------------------------------------------------------- ext4 images, never mounted


def _tool(cmd: list[str], what: str, *, input_bytes: bytes | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, input=input_bytes, capture_output=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"{what}: {' '.join(cmd)} exited {done.returncode}: {done.stderr.decode(errors='replace')}")
    return done


def make_ext4(path: Path, size: int) -> Path:
    """A sparse file of ``size`` bytes holding a fresh ext4 with 4 KiB blocks, asking for
    2 MiB-aligned extents (stripe_width=512 blocks), as `make run`'s image and the bench do.

    4 KiB blocks matter: a small image defaults to 1 KiB blocks, and ext4 refuses DAX
    ("unsupported blocksize for DAX") unless the block size equals the page size. The stripe
    lets a DAX mapping of a file take 2 MiB (PMD) faults (README "DAX with 2 MiB pages").
    """
    with open(path, "wb") as f:
        f.truncate(size)
    _tool(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "stripe_width=512", str(path)], "mkfs.ext4")
    return path


def debugfs(image: Path, *commands: str, write: bool = False) -> str:
    """Run debugfs commands on ``image``; fails on any error line. Returns stdout.

    debugfs exits 0 even when a command fails and prints the failure on stderr, after its
    version banner; so every stderr line but the banner is an error.
    """
    cmd = ["debugfs"] + (["-w"] if write else [])
    if len(commands) == 1:
        done = _tool(cmd + ["-R", commands[0], str(image)], "debugfs")
    else:  # several commands in one run: "-f -" reads them from stdin
        script = "\n".join(commands).encode() + b"\n"
        done = _tool(cmd + ["-f", "-", str(image)], "debugfs", input_bytes=script)
    errors = [
        line
        for line in done.stderr.decode(errors="replace").splitlines()
        if line.strip() and not line.startswith("debugfs ") and not line.startswith("\tUsing EXT2FS Library")
    ]
    if errors:
        pytest.fail(f"debugfs {commands!r} on {image}: " + "; ".join(errors))
    return done.stdout.decode(errors="replace")


def install_init(image: Path, init_binary: Path) -> None:
    """Put ``init_binary`` at /sbin/init of the (unmounted) ext4 ``image``, mode 0100755,
    plus the empty /dev, /proc and /sys the kernel (devtmpfs) and the init mount on."""
    debugfs(
        image,
        "mkdir sbin",
        "mkdir dev",
        "mkdir proc",
        "mkdir sys",
        f"write {init_binary} sbin/init",
        "set_inode_field sbin/init mode 0100755",
        write=True,
    )
    stat = debugfs(image, "stat sbin/init")
    assert re.search(r"Type: regular\s+Mode:\s+0755", stat), f"sbin/init not a 0755 regular file:\n{stat}"
    size = re.search(r"Size: (\d+)", stat)
    assert size and int(size.group(1)) == init_binary.stat().st_size, f"sbin/init has the wrong size:\n{stat}"


def cat_file(image: Path, path_in_fs: str) -> str:
    """A file's contents read from the unmounted ext4 ``image`` with ``debugfs -R cat``."""
    return debugfs(image, f"cat {path_in_fs}")


def superblock(image: Path) -> dict[str, str]:
    """``dumpe2fs -h``: superblock field name -> value (e.g. "Mount count" -> "1")."""
    out = _tool(["dumpe2fs", "-h", str(image)], "dumpe2fs").stdout.decode(errors="replace")
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep and key and not key.startswith(" "):
            fields.setdefault(key.strip(), value.strip())
    return fields


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- running minivmm


def run_minivmm(tmp_path: Path, name: str, args: list[str], timeout: float = BOOT_TIMEOUT) -> RunResult:
    """``python -m minivmm run ARGS`` through the one runner (tests/support/runner.py), stdin
    /dev/null, outputs and --stats-json in tmp_path/NAME.*; a timeout fails the test."""
    run = _run(args, tmp_path, timeout=timeout, name=name)
    print(f"{name}: exit {run.status} after {run.wall:.1f} s")
    check(run, not run.timed_out, f"{name}: minivmm did not finish within {timeout:.0f} s")
    return run


def check(run: RunResult, condition: object, message: str) -> None:
    """Fail with ``message`` and the output tails unless ``condition``."""
    if not condition:
        pytest.fail(f"{message}\n{run.describe(TAIL_LINES)}", pytrace=False)


def init_lines(run: RunResult) -> list[str]:
    """The test init's result lines (without the prefix), in order.

    say() writes each line to /dev/kmsg and then to /dev/console, so depending on the
    console setup it shows once or twice in a row; a line equal to the previous init line
    is that echo and is dropped (the tests never expect two equal results in a row).
    """
    lines: list[str] = []
    for text in run.stdout.splitlines():
        m = _INIT_LINE_RE.search(text)
        if m and (not lines or lines[-1] != m.group(1)):
            lines.append(m.group(1))
    return lines


def init_line(run: RunResult, prefix: str) -> str | None:
    """The first init result line starting with ``prefix``."""
    return next((line for line in init_lines(run) if line.startswith(prefix)), None)


def init_lines_with(run: RunResult, prefix: str) -> list[str]:
    return [line for line in init_lines(run) if line.startswith(prefix)]


def pmem_stats(run: RunResult, ident: str) -> PmemDeviceStats:
    """The --stats-json counters of pmem device ``ident``."""
    check(run, run.stats is not None, "minivmm wrote no --stats-json")
    assert run.stats is not None
    found = run.stats.pmem_device(ident)
    check(run, found is not None, f"--stats-json has no pmem device {ident!r} (have {[p.id for p in run.stats.pmem]})")
    assert found is not None
    return found
