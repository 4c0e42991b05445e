"""Build the default guest: a small Linux kernel and a busybox initramfs.

Inputs live in the repository's ``guest/`` directory; outputs in a content-addressed
cache, ``${XDG_CACHE_HOME:-~/.cache}/minivmm``:

- ``kernel-<hash16>/{vmlinux,bzImage,config,System.map}``: one per kernel flavour, the SMP
  kernel (``guest/kernel.config``) and the uniprocessor one (that plus ``guest/kernel-up.config``)
- ``initramfs-<hash16>.cpio``: an uncompressed newc archive (see `_build_initramfs`)
- ``linux-src-<version>/`` and ``linux-obj-<version>[-up]/``: the unpacked, patched Debian
  ``linux-source-6.1`` tree and an object directory per flavour, reused so rebuilds are incremental
- ``logs/``: full ``make`` output of each build
- ``guest.json``: the manifest of the last build (``minivmm/guestmanifest.py``), the only
  thing ``minivmm run`` reads to find the default guest

Artifacts are built in a temporary path next to their final name and renamed at the
end, so a killed build never leaves a half-written cache entry.

Command line: ``minivmm guest build [--force]|paths|prune`` (``minivmm/cli.py``);
``python -m minivmm.guestimage ...`` is the same command.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gzip
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

from minivmm.errors import MinivmmError, UserError
# The lookup side; default_kernel/default_initrd stay importable from here for the tests.
from minivmm.guestmanifest import (GuestManifest, cache_dir, default_initrd, default_kernel,
                                   read_manifest, write_manifest)

GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"
LINUX_PACKAGE = "linux-source-6.1"
LINUX_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX = Path("/bin/busybox")
MUSL_PACKAGE = "musl-tools"
MAKE_JOBS = 2

# Bump when the build recipe itself changes (commands, layout), so the hash moves.
KERNEL_RECIPE = "1"
INITRAMFS_RECIPE = "4"

# Tool on PATH (or header file) -> Debian package that provides it.
_KERNEL_TOOLS = {
    "make": "make", "gcc": "gcc", "ld": "binutils", "flex": "flex", "bison": "bison",
    "bc": "bc", "perl": "perl", "tar": "tar", "xz": "xz-utils", "lz4": "lz4",
    "patch": "patch",
}
_KERNEL_HEADERS = {"/usr/include/libelf.h": "libelf-dev"}
_INITRAMFS_TOOLS = {"gcc": "gcc", "musl-gcc": MUSL_PACKAGE, "tar": "tar", "xz": "xz-utils"}
# The kernel's UAPI headers, which minivmm-test includes beside musl's own.
_UAPI_HEADERS = {"linux": Path("/usr/include/linux"),
                 "asm": Path("/usr/include/x86_64-linux-gnu/asm"),
                 "asm-generic": Path("/usr/include/asm-generic")}
_INITRAMFS_HEADERS = {str(path): "linux-libc-dev" for path in _UAPI_HEADERS.values()}

# Directories of the initramfs, the mount points of /etc/fstab and /init's /mnt included.
_INITRAMFS_DIRS = ("/bin", "/sbin", "/usr", "/usr/bin", "/usr/sbin", "/dev", "/proc",
                   "/sys", "/mnt", "/tmp", "/etc", "/etc/minivmm", "/root")

# The only busybox applet links: what something executes by path rather than by name.
# Debian's busybox-static sh is built with FEATURE_SH_STANDALONE (and PREFER_APPLETS), so its
# shell, and applets that run a command (setsid, taskset, xargs, ...), run any applet by name
# without a link. Each link costs the guest kernel a cpio entry to unpack: path walks and a
# new tmpfs inode, whose random i_generation is expensive while the RNG is unseeded.
_APPLET_LINKS = (
    "/bin/sh",       # the #! line of /init and of /etc/minivmm/*.sh
    "/bin/true",     # minivmm-test's fork-exec step; selftest.sh's fork-exec step
    "/bin/cat",      # selftest.sh: an exec'd program's /proc/self/comm
    "/bin/ls",       # selftest.sh's pipe step: /bin/ls /bin | /usr/bin/wc -l
    "/usr/bin/wc",
)


@dataclass(frozen=True)
class KernelFlavour:
    """One kernel built from guest/: its config fragments, merged in this order onto tinyconfig
    (a later fragment's line overrides an earlier one's, as in merge_config.sh)."""

    name: str
    fragments: tuple[str, ...]  # file names in guest/
    obj_suffix: str  # its own object directory: building both flavours stays incremental


SMP_KERNEL = KernelFlavour("smp", ("kernel.config",), "")
# `minivmm run --cpus 1` (the default) boots this one: guest/kernel-up.config says why.
UP_KERNEL = KernelFlavour("up", ("kernel.config", "kernel-up.config"), "-up")
KERNEL_FLAVOURS = (SMP_KERNEL, UP_KERNEL)


class BuildError(MinivmmError):
    """A build step failed; the message names the log holding the details."""


# ---------------------------------------------------------------- locations


def guest_dir() -> Path:
    """The build inputs: ``guest/`` of the checkout this module belongs to."""
    if not GUEST_DIR.is_dir():
        # An installed minivmm (pip install .) carries no guest sources; it only reads
        # the manifest of a build made in a checkout.
        raise UserError(f"no guest sources at {GUEST_DIR}: build the default guest in a "
                        "minivmm checkout with `make guest`")
    return GUEST_DIR


def kernel_dir(guest: Path | None = None, flavour: KernelFlavour = SMP_KERNEL) -> Path:
    """Cache directory of the ``flavour`` kernel built from the current inputs."""
    return cache_dir() / f"kernel-{kernel_hash(guest, flavour)[:16]}"


def initramfs_path(guest: Path | None = None) -> Path:
    """Cache path of the initramfs built from the current inputs."""
    return cache_dir() / f"initramfs-{initramfs_hash(guest)[:16]}{INITRAMFS_SUFFIX}"


INITRAMFS_SUFFIX = ".cpio"
GZIP_MAGIC = b"\x1f\x8b"


def initramfs_archive(path: Path) -> bytes:
    """The newc archive in an initramfs file: as stored, or gunzipped (a build before the
    archive was stored uncompressed, or a user's own ``--initrd``)."""
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == GZIP_MAGIC else data


def _log_name(initramfs_name: str) -> str:
    """The build log's name of an initramfs file (old ``.cpio.gz`` names too)."""
    return initramfs_name.removesuffix(".gz").removesuffix(INITRAMFS_SUFFIX) + ".log"


# ---------------------------------------------------------------- input hashing


def _run_text(cmd: Sequence[str]) -> str | None:
    """stdout of a small query command, or None if it cannot run or fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# Tool versions are queried once per process: hashing runs often, tools rarely change.
@functools.cache
def _dpkg_version(package: str) -> str | None:
    return _run_text(["dpkg-query", "-W", "-f=${Version}", package]) or None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def linux_source_version() -> str:
    """Version of the kernel source: the Debian package's, else the tarball's sha256."""
    version = _dpkg_version(LINUX_PACKAGE)
    if version:
        return version
    if LINUX_TARBALL.is_file():
        return "sha256-" + _file_sha256(LINUX_TARBALL)[:16]
    # No source: nothing cached can match, and a build stops at the unpack step
    # with an install hint.
    return "missing"


@functools.cache
def gcc_version() -> str:
    first = (_run_text(["gcc", "--version"]) or "").splitlines()
    return first[0] if first else "no-gcc"


def busybox_version() -> str:
    version = _dpkg_version(BUSYBOX_PACKAGE)
    if version:
        return version
    return "sha256-" + _file_sha256(BUSYBOX)[:16] if BUSYBOX.is_file() else "no-busybox"


def _guest_files(guest: Path, patterns: Sequence[str]) -> list[Path]:
    files: set[Path] = set()
    for pattern in patterns:
        files.update(p for p in guest.glob(pattern) if p.is_file())
    return sorted(files)


def _hash_inputs(guest: Path, patterns: Sequence[str], facts: dict[str, str]) -> str:
    """sha256 over the named guest/ files (path and bytes) and the tool/source facts."""
    digest = hashlib.sha256()
    for path in _guest_files(guest, patterns):
        data = path.read_bytes()
        rel = path.relative_to(guest).as_posix()
        digest.update(f"file {rel} {len(data)}\n".encode())
        digest.update(data)
    for key in sorted(facts):
        digest.update(f"fact {key}={facts[key]}\n".encode())
    return digest.hexdigest()


_KERNEL_PATCHES = "patches/*.patch"
_INITRAMFS_INPUTS = ("init.sh", "fstab", "testinit/*.c", "testinit/*.h", "scripts/*.sh")


def kernel_hash(guest: Path | None = None, flavour: KernelFlavour = SMP_KERNEL) -> str:
    """sha256 of everything the ``flavour`` kernel build reads: its fragments, the patches,
    source and gcc versions (the flavours differ by their fragments)."""
    facts = {"recipe": KERNEL_RECIPE, "linux": linux_source_version(), "gcc": gcc_version()}
    return _hash_inputs(guest or guest_dir(), (*flavour.fragments, _KERNEL_PATCHES), facts)


def initramfs_hash(guest: Path | None = None) -> str:
    """sha256 of everything in the initramfs: init script, fstab, C sources, scripts, busybox,
    gcc, musl."""
    facts = {
        "recipe": INITRAMFS_RECIPE,
        "busybox": busybox_version(),
        "gcc": gcc_version(),
        "musl": _dpkg_version(MUSL_PACKAGE) or "no-musl",
        # gen_init_cpio comes from the kernel source tree.
        "linux": linux_source_version(),
    }
    return _hash_inputs(guest or guest_dir(), _INITRAMFS_INPUTS, facts)


# ---------------------------------------------------------------- small helpers


def _say(msg: str) -> None:
    print(f"guest: {msg}", flush=True)


def _check_tools(tools: dict[str, str], headers: dict[str, str]) -> None:
    """UserError naming the Debian packages to install when a build tool is missing."""
    missing = [pkg for tool, pkg in tools.items() if shutil.which(tool) is None]
    missing += [pkg for path, pkg in headers.items() if not Path(path).exists()]
    if missing:
        pkgs = " ".join(sorted(set(missing)))
        raise UserError(f"guest build needs missing packages: apt-get install {pkgs}")


def _version_key(version: str) -> str:
    """A Debian version usable in a file name (no ':' or '~')."""
    return re.sub(r"[^A-Za-z0-9.+-]", "_", version)


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """One build at a time per cache: builds share the source and object trees.

    Holding the lock, any ``*.tmp-*`` left in the cache belongs to a killed build.
    """
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in cache_dir().glob("*.tmp-*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        yield


def _fresh_tmp(final: Path) -> Path:
    """A temporary sibling of ``final`` (same filesystem, so rename is atomic)."""
    return Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))


def is_static_elf(path: Path) -> bool:
    """True if ``path`` is an ELF64 executable without a program interpreter."""
    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    types = [struct.unpack_from("<I", table, i * phentsize)[0] for i in range(phnum)]
    pt_interp = 3
    return pt_interp not in types


def _run_logged(cmd: Sequence[str], log: Path, what: str, cwd: Path | None = None,
                env: dict[str, str] | None = None) -> None:
    """Run ``cmd``, appending its output to ``log`` and showing a short progress line."""
    tty = sys.stdout.isatty()
    start = time.monotonic()
    last_shown = 0.0 if tty else start
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()  # the log is what a user tails while a build runs
            now = time.monotonic()
            # On a terminal: redraw one line; in a log or CI: one line per 15 s.
            if now - last_shown >= (0.2 if tty else 15.0):
                last_shown = now
                _progress(what, now - start, line.strip(), tty)
        rc = proc.wait()
    if tty:
        print("\r\033[K", end="", flush=True)
    if rc != 0:
        _show_log_tail(log)
        raise BuildError(f"{what} failed (exit status {rc}); full log: {log}")


def _progress(what: str, elapsed: float, line: str, tty: bool) -> None:
    stamp = f"{int(elapsed) // 60}m{int(elapsed) % 60:02d}s"
    text = f"guest: {what} {stamp} {line}"[:100]
    print(("\r\033[K" + text) if tty else text, end="" if tty else "\n", flush=True)


def _show_log_tail(log: Path, lines: int = 30) -> None:
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    print(f"guest: last {len(tail)} lines of {log}:", file=sys.stderr)
    for line in tail:
        print(f"  {line}", file=sys.stderr)


# ---------------------------------------------------------------- kernel source tree


def _patches(guest: Path) -> list[Path]:
    return _guest_files(guest, ["patches/*.patch"])


def _patch_series_id(patches: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in patches:
        digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return digest.hexdigest()


def _unpack_source(tree: Path, obj: Path, log: Path) -> None:
    """Unpack the Debian tarball to ``tree`` (atomically) with no patches applied."""
    if not LINUX_TARBALL.is_file():
        raise UserError(f"{LINUX_TARBALL} not found: apt-get install {LINUX_PACKAGE}")
    _say(f"unpacking {LINUX_TARBALL} (about 10 s)")
    tmp = _fresh_tmp(tree)
    _run_logged(["tar", "-xJf", str(LINUX_TARBALL), "-C", str(tmp)], log, "unpack")
    tops = list(tmp.iterdir())
    if len(tops) != 1 or not (tops[0] / "Makefile").is_file():
        raise BuildError(f"unexpected layout of {LINUX_TARBALL}")
    (tops[0] / ".minivmm-patches").write_text(_patch_series_id([]))
    # Objects built from another copy of the tree may be newer than these sources
    # (tar keeps the archive's mtimes): start the object directories afresh.
    for flavour in KERNEL_FLAVOURS:
        shutil.rmtree(_flavour_obj(obj, flavour), ignore_errors=True)
    tops[0].rename(tree)
    tmp.rmdir()


def _apply_patches(tree: Path, patches: list[Path], log: Path) -> None:
    """Bring ``tree`` to exactly ``patches`` applied: revert the old series, apply the new."""
    stamp = tree / ".minivmm-patches"
    want = _patch_series_id(patches)
    if stamp.read_text() == want:
        return
    applied = tree / ".minivmm-applied"
    stamp.write_text("dirty")  # a crash from here on makes the next build re-unpack
    for old in sorted(applied.glob("*.patch"), reverse=True) if applied.is_dir() else []:
        _say(f"reverting {old.name}")
        _run_logged(["patch", "-p1", "-R", "--batch", "-d", str(tree), "-i", str(old)],
                    log, f"revert {old.name}")
        old.unlink()
    applied.mkdir(exist_ok=True)
    for new in patches:
        _say(f"applying {new.name}")
        try:
            _run_logged(["patch", "-p1", "--forward", "--batch", "-d", str(tree),
                         "-i", str(new)], log, f"patch {new.name}")
        except BuildError as err:
            raise UserError(f"guest patch {new.name} does not apply to "
                            f"{LINUX_PACKAGE} {linux_source_version()}: see {log}") from err
        shutil.copyfile(new, applied / new.name)
    stamp.write_text(want)


def _source_tree(guest: Path, log: Path) -> tuple[Path, Path]:
    """The patched source tree and object directory for this source version."""
    key = _version_key(linux_source_version())
    tree = cache_dir() / f"linux-src-{key}"
    obj = cache_dir() / f"linux-obj-{key}"
    stamp = tree / ".minivmm-patches"
    if tree.is_dir() and (not stamp.is_file() or stamp.read_text() == "dirty"):
        _say(f"discarding {tree}: interrupted patching")
        shutil.rmtree(tree)
    if not tree.is_dir():
        _unpack_source(tree, obj, log)
    _apply_patches(tree, _patches(guest), log)
    obj.mkdir(exist_ok=True)
    return tree, obj


def _flavour_obj(obj: Path, flavour: KernelFlavour) -> Path:
    """The object directory of ``flavour`` (``obj`` is the SMP kernel's)."""
    return obj.with_name(obj.name + flavour.obj_suffix)


# ---------------------------------------------------------------- kernel


Fragments = Path | Sequence[Path]


def fragment_settings(fragments: Fragments) -> dict[str, str]:
    """``CONFIG_X -> value`` (``"n"`` for ``is not set``) of fragments merged in order: the
    last line naming a symbol wins, as in merge_config.sh."""
    settings: dict[str, str] = {}
    for fragment in [fragments] if isinstance(fragments, Path) else fragments:
        for line in fragment.read_text().splitlines():
            if m := re.match(r"^(CONFIG_[A-Za-z0-9_]+)=(.*?)\s*$", line):
                settings[m.group(1)] = m.group(2)
            elif m := re.match(r"^# (CONFIG_[A-Za-z0-9_]+) is not set\s*$", line):
                settings[m.group(1)] = "n"
    return settings


def fragment_symbols(fragments: Fragments) -> list[str]:
    """The ``CONFIG_X`` names the (merged) fragments set to ``=y``."""
    return [sym for sym, value in fragment_settings(fragments).items() if value == "y"]


def config_values(config: Path) -> dict[str, str]:
    """``CONFIG_X -> value`` for every set symbol of a ``.config``."""
    values: dict[str, str] = {}
    for line in config.read_text().splitlines():
        m = re.match(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$", line)
        if m:
            values[m.group(1)] = m.group(2)
    return values


def missing_symbols(fragments: Fragments, config: Path) -> list[str]:
    """Symbols the fragments want ``=y`` that are not ``=y`` in ``config``."""
    have = config_values(config)
    return [s for s in fragment_symbols(fragments) if have.get(s) != "y"]


def unwanted_symbols(fragments: Fragments, config: Path) -> list[str]:
    """Symbols the fragments mark ``is not set`` that are still set in ``config``."""
    have = config_values(config)
    return [s for s, value in fragment_settings(fragments).items() if value == "n" and s in have]


def _kbuild_env() -> dict[str, str]:
    # Fixed identity strings: the same inputs give the same `uname -v`.
    env = dict(os.environ)
    env.update(KBUILD_BUILD_USER="minivmm", KBUILD_BUILD_HOST="minivmm",
               KBUILD_BUILD_TIMESTAMP="1970-01-01", LC_ALL="C")
    return env


def _configure(tree: Path, obj: Path, fragments: list[Path], log: Path) -> None:
    """tinyconfig + fragments + olddefconfig, then check that every wanted symbol is ``=y``."""
    make = ["make", "-C", str(tree), f"O={obj}"]
    env = _kbuild_env()
    _run_logged(make + ["tinyconfig"], log, "tinyconfig", env=env)
    _run_logged([str(tree / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(obj),
                 str(obj / ".config"), *map(str, fragments)], log, "merge_config", cwd=tree, env=env)
    _run_logged(make + ["olddefconfig"], log, "olddefconfig", env=env)
    missing = missing_symbols(fragments, obj / ".config")
    if missing:
        raise BuildError("kernel config lost symbols (unmet Kconfig dependencies): "
                         + " ".join(missing) + f"; see {obj / '.config'}")
    # Switching a default off is only an optimisation: say so, do not fail.
    still_on = unwanted_symbols(fragments, obj / ".config")
    if still_on:
        _say("note: selected by other options, left on: " + " ".join(still_on))


def build_kernel(force: bool = False, guest: Path | None = None,
                 flavour: KernelFlavour = SMP_KERNEL) -> Path:
    """Build the ``flavour`` kernel if its cache entry is missing; returns ``kernel-<hash16>/``."""
    guest = guest or guest_dir()
    final = kernel_dir(guest, flavour)
    with _build_lock():
        if final.is_dir() and not force:
            _say(f"{flavour.name} kernel up to date: {final}")
            return final
        _build_kernel(guest, final, flavour)
    return final


def _build_kernel(guest: Path, final: Path, flavour: KernelFlavour) -> None:
    _check_tools(_KERNEL_TOOLS, _KERNEL_HEADERS)
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{final.name}.log"
    log.write_text("")
    started = time.monotonic()
    _say(f"building {flavour.name} kernel {final.name} (log: {log})")
    tree, obj = _source_tree(guest, log)
    obj = _flavour_obj(obj, flavour)
    obj.mkdir(exist_ok=True)
    _say("configuring: tinyconfig + " + " + ".join(f"guest/{name}" for name in flavour.fragments))
    _configure(tree, obj, [guest / name for name in flavour.fragments], log)
    _say(f"compiling with make -j{MAKE_JOBS} (about 6 min from scratch on 2 cores)")
    _run_logged(["make", "-C", str(tree), f"O={obj}", f"-j{MAKE_JOBS}", "vmlinux",
                 "bzImage"], log, "make", env=_kbuild_env())
    tmp = _fresh_tmp(final)
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache entry is for every user
        for src, name in ((obj / "vmlinux", "vmlinux"),
                          (obj / "arch/x86/boot/bzImage", "bzImage"),
                          (obj / ".config", "config"),
                          (obj / "System.map", "System.map")):
            shutil.copyfile(src, tmp / name)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"kernel done in {time.monotonic() - started:.0f} s: {final}")


# ---------------------------------------------------------------- initramfs


def _busybox_applets() -> list[str]:
    """Install paths of the busybox applets, e.g. ``bin/sh``, ``sbin/poweroff``."""
    out = _run_text([str(BUSYBOX), "--list-full"])
    if not out:
        raise UserError(f"{BUSYBOX} cannot list its applets: apt-get install {BUSYBOX_PACKAGE}")
    return [line.strip().lstrip("/") for line in out.splitlines() if line.strip()]


def _applet_links() -> list[str]:
    """`_APPLET_LINKS`, checked against busybox's own list (a link to an applet it lacks, or
    at another path than busybox installs it, would only fail inside the guest)."""
    have = {"/" + path for path in _busybox_applets()}
    missing = [link for link in _APPLET_LINKS if link not in have]
    if missing:
        raise UserError(f"{BUSYBOX} has no applet " + ", ".join(missing)
                        + f": apt-get install {BUSYBOX_PACKAGE}")
    return list(_APPLET_LINKS)


def _cpio_list(guest: Path, test_init: Path) -> str:
    """gen_init_cpio's file list: nothing root-owned is needed on the host."""
    lines = [f"dir {d} 0755 0 0" for d in _INITRAMFS_DIRS]
    lines += ["nod /dev/console 0600 0 0 c 5 1", "nod /dev/null 0666 0 0 c 1 3",
              f"file /init {guest / 'init.sh'} 0755 0 0",
              f"file /etc/fstab {guest / 'fstab'} 0644 0 0",
              f"file /bin/busybox {BUSYBOX} 0755 0 0",
              f"file /sbin/minivmm-test {test_init} 0755 0 0"]
    for script in _guest_files(guest, ["scripts/*.sh"]):
        lines.append(f"file /etc/minivmm/{script.name} {script} 0755 0 0")
    lines += [f"slink {link} /bin/busybox 0777 0 0" for link in _applet_links()]
    return "\n".join(lines) + "\n"


def _build_test_init(guest: Path, tmp: Path, log: Path) -> Path:
    """``/sbin/minivmm-test``, static against musl: about 90 KB where static glibc made
    900 KB, which the guest kernel copies while unpacking the initramfs (emulated on
    software KVM). musl-gcc's include path holds no kernel headers: the UAPI ones are
    linked into a private directory (all of /usr/include would mix in glibc's)."""
    uapi = tmp / "uapi"
    uapi.mkdir()
    for name, path in _UAPI_HEADERS.items():
        (uapi / name).symlink_to(path)
    test_init = tmp / "minivmm-test"
    _run_logged(["musl-gcc", "-static", "-O2", "-s", "-Wall", "-pthread", "-isystem", str(uapi),
                 "-o", str(test_init), str(guest / "testinit/minivmm-test.c")], log,
                "minivmm-test")
    if not is_static_elf(test_init):
        raise BuildError(f"{test_init} is not a static executable")
    return test_init


def _gen_init_cpio(tree: Path, tmp: Path, log: Path) -> Path:
    tool = tmp / "gen_init_cpio"
    _run_logged(["gcc", "-O2", "-o", str(tool), str(tree / "usr/gen_init_cpio.c")], log,
                "gen_init_cpio")
    return tool


def build_initramfs(force: bool = False, guest: Path | None = None) -> Path:
    """Build the initramfs if its cache entry is missing; returns its path."""
    guest = guest or guest_dir()
    final = initramfs_path(guest)
    with _build_lock():
        if final.is_file() and not force:
            _say(f"initramfs up to date: {final}")
            return final
        _build_initramfs(guest, final)
    return final


def _build_initramfs(guest: Path, final: Path) -> None:
    _check_tools(_INITRAMFS_TOOLS, _INITRAMFS_HEADERS)
    if not BUSYBOX.is_file() or not is_static_elf(BUSYBOX):
        raise UserError(f"{BUSYBOX} is missing or not static: apt-get install {BUSYBOX_PACKAGE}")
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / _log_name(final.name)
    log.write_text("")
    started = time.monotonic()
    _say(f"building initramfs {final.name} (log: {log})")
    tree, _ = _source_tree(guest, log)
    tmp = _fresh_tmp(final)
    try:
        test_init = _build_test_init(guest, tmp, log)
        cpio_list = tmp / "cpio.list"
        cpio_list.write_text(_cpio_list(guest, test_init))
        tool = _gen_init_cpio(tree, tmp, log)
        archive = subprocess.run([str(tool), "-t", "0", str(cpio_list)], check=False,
                                 capture_output=True)
        if archive.returncode != 0:
            raise BuildError(f"gen_init_cpio failed: {archive.stderr.decode(errors='replace')}")
        packed = tmp / final.name
        # Uncompressed: the kernel unpacks a newc archive in place (init/initramfs.c copies
        # each file once, into the page cache), while even gzip's stored blocks went through
        # zlib's output buffer and its window first: three copies of every byte, in
        # emulated ring 0 on kvm_pvm (README "Boot time"). The host reads 3 MB either way.
        packed.write_bytes(archive.stdout)
        packed.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"initramfs done in {time.monotonic() - started:.0f} s: {final}")


# ---------------------------------------------------------------- both


def prune(guest: Path | None = None) -> list[Path]:
    """Delete cached kernels, initramfs images and logs other than the current ones and
    the manifest's (which another checkout may have built)."""
    keep = {*(kernel_dir(guest, flavour).name for flavour in KERNEL_FLAVOURS),
            initramfs_path(guest).name}
    manifest = read_manifest()
    if manifest is not None:
        keep |= {path.parent.name for path in manifest.kernels().values()}
        keep.add(manifest.initrd.name)
    keep |= {_log_name(name) for name in keep}
    removed = []
    with _build_lock():
        for path in [*cache_dir().glob("kernel-*"), *cache_dir().glob("initramfs-*"),
                     *(cache_dir() / "logs").glob("*.log")]:
            if path.name in keep:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def build(force: bool = False, guest: Path | None = None) -> GuestManifest:
    """Build what is missing (everything with ``force``), then record it in the manifest."""
    guest = guest or guest_dir()
    kernel = build_kernel(force, guest, SMP_KERNEL)
    kernel_up = build_kernel(force, guest, UP_KERNEL)
    initrd = build_initramfs(force, guest)
    manifest = GuestManifest(
        vmlinux=kernel / "vmlinux",
        bzimage=kernel / "bzImage",
        vmlinux_up=kernel_up / "vmlinux",
        bzimage_up=kernel_up / "bzImage",
        initrd=initrd,
        kernel_hash=kernel_hash(guest),
        kernel_up_hash=kernel_hash(guest, UP_KERNEL),
        initramfs_hash=initramfs_hash(guest),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        sources=str(guest),
        versions={"linux": linux_source_version(), "gcc": gcc_version(),
                  "busybox": busybox_version()},
    )
    with _build_lock():  # a concurrent build's manifest is written whole, before or after ours
        _say(f"manifest: {write_manifest(manifest)}")
    return manifest


if __name__ == "__main__":
    # The command line is defined once, as `minivmm guest ...`.
    from minivmm.cli import main

    sys.exit(main(["guest", *sys.argv[1:]]))
