"""Where the default guest is: the manifest that `make guest` writes and `minivmm run` reads.

The build (``minivmm/guestimage.py``) hashes its inputs, builds what is missing and then
writes ``${XDG_CACHE_HOME:-~/.cache}/minivmm/guest.json``. Locating the default guest only
reads that file: no sources, no tool versions, no hashing. The location depends on the
user, not on where minivmm is installed, so a minivmm installed anywhere (``pip install .``
into another environment) finds the guest a checkout built.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from minivmm.errors import UserError

MANIFEST_NAME = "guest.json"
MANIFEST_FORMAT = 1
KERNEL_KINDS = ("vmlinux", "bzImage")
# The uniprocessor build of the same kernel (guest/kernel-up.config): what a one-vCPU run boots.
UP_KERNEL_KINDS = ("vmlinux-up", "bzImage-up")
NOT_BUILT = "the default guest is not built: run `make guest` in a minivmm checkout (or pass --kernel)"


def cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/minivmm``: the build cache and its manifest (XDG Base Directory)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "minivmm"


def manifest_path() -> Path:
    return cache_dir() / MANIFEST_NAME


@dataclass(frozen=True)
class GuestManifest:
    """What one build produced: the artifact paths and what they were built from."""

    vmlinux: Path  # ELF with the PVH entry note
    bzimage: Path  # the same kernel for the x86 boot protocol
    initrd: Path  # newc cpio (uncompressed; gzip'd in builds before issue 12)
    kernel_hash: str  # guestimage.kernel_hash() of the inputs
    initramfs_hash: str  # guestimage.initramfs_hash() of the inputs
    built_at: str  # UTC, ISO 8601
    sources: str  # the guest/ directory built from
    versions: dict[str, str] = field(default_factory=dict)  # linux, gcc, busybox
    # The uniprocessor kernel (CONFIG_SMP off); None in a manifest written before it existed.
    vmlinux_up: Path | None = None
    bzimage_up: Path | None = None
    kernel_up_hash: str | None = None  # guestimage.kernel_hash(guest, UP_KERNEL)

    def kernels(self) -> dict[str, Path]:
        """Kind (``KERNEL_KINDS``, then the ``UP_KERNEL_KINDS`` this build has) -> path."""
        found = {"vmlinux": self.vmlinux, "bzImage": self.bzimage,
                 "vmlinux-up": self.vmlinux_up, "bzImage-up": self.bzimage_up}
        return {kind: path for kind, path in found.items() if path is not None}

    def kernel(self, kind: str = "vmlinux") -> Path | None:
        """The kernel of ``kind``; None for an uniprocessor kind this manifest lacks."""
        _check_kind(kind)
        return self.kernels().get(kind)

    def boot_kernel(self, cpus: int) -> Path:
        """The vmlinux `minivmm run` boots for ``cpus`` vCPUs: the uniprocessor one for a single
        vCPU (an SMP kernel on one CPU still pays for per-CPU load tracking, tree RCU and
        ``lock`` prefixes, all emulated on kvm_pvm), else the SMP one. An older manifest
        without an uniprocessor kernel boots its SMP kernel either way."""
        if cpus == 1 and self.vmlinux_up is not None:
            return self.vmlinux_up
        return self.vmlinux

    def artifacts(self) -> dict[str, Path]:
        return {**self.kernels(), "initrd": self.initrd}

    def describe(self) -> str:
        """``NAME: PATH`` per artifact, then when and from what it was built."""
        lines = [f"{name}: {path}" for name, path in self.artifacts().items()]
        versions = "; ".join(f"{k}: {v}" for k, v in self.versions.items())
        lines.append(f"built: {self.built_at} from {self.sources}" + (f" ({versions})" if versions else ""))
        return "\n".join(lines)

    def to_json(self) -> str:
        data = {
            "format": MANIFEST_FORMAT,
            **{name: str(path) for name, path in self.artifacts().items()},
            "kernel_hash": self.kernel_hash,
            **({"kernel_up_hash": self.kernel_up_hash} if self.kernel_up_hash is not None else {}),
            "initramfs_hash": self.initramfs_hash,
            "built_at": self.built_at,
            "sources": self.sources,
            "versions": self.versions,
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, base: Path) -> GuestManifest:
        """Parse a manifest; relative artifact paths are relative to ``base``. ValueError if malformed."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a format-{MANIFEST_FORMAT} guest manifest")
        try:
            return cls(
                vmlinux=base / data["vmlinux"],
                bzimage=base / data["bzImage"],
                initrd=base / data["initrd"],
                kernel_hash=str(data["kernel_hash"]),
                initramfs_hash=str(data["initramfs_hash"]),
                built_at=str(data["built_at"]),
                sources=str(data["sources"]),
                versions={str(k): str(v) for k, v in data.get("versions", {}).items()},
                vmlinux_up=base / data["vmlinux-up"] if "vmlinux-up" in data else None,
                bzimage_up=base / data["bzImage-up"] if "bzImage-up" in data else None,
                kernel_up_hash=str(data["kernel_up_hash"]) if "kernel_up_hash" in data else None,
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"guest manifest lacks {err}") from None


def write_manifest(manifest: GuestManifest) -> Path:
    """Replace the manifest atomically (a reader sees the old one or the new one, whole)."""
    path = manifest_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=MANIFEST_NAME + ".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(manifest.to_json())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is readable by every user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_manifest() -> GuestManifest | None:
    """The manifest of the last build, or None when there is none (UserError if unreadable)."""
    path = manifest_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UserError(f"{path}: {err.strerror}") from None
    try:
        return GuestManifest.from_json(text, path.parent)
    except ValueError as err:
        raise UserError(f"{path}: {err}: run `make guest` again") from None


def default_guest() -> GuestManifest:
    """The built default guest; a one-line UserError when it is not built or a file is gone."""
    manifest = read_manifest()
    if manifest is None:
        raise UserError(NOT_BUILT)
    missing = [str(path) for path in manifest.artifacts().values() if not path.is_file()]
    if missing:
        raise UserError(f"{NOT_BUILT}; {manifest_path()} names missing {', '.join(missing)}")
    return manifest


def _check_kind(kind: str) -> None:
    if kind not in KERNEL_KINDS + UP_KERNEL_KINDS:
        raise ValueError(f"kernel kind must be one of {KERNEL_KINDS + UP_KERNEL_KINDS}, not {kind!r}")


def default_kernel(kind: str = "vmlinux") -> Path | None:
    """The default guest kernel (``vmlinux`` for PVH entry, or ``bzImage``; the SMP build, as
    ``--kernel`` boots with any ``--cpus``; ``vmlinux-up``/``bzImage-up``: the uniprocessor
    build), or None if not built."""
    _check_kind(kind)
    manifest = read_manifest()
    path = manifest.kernel(kind) if manifest else None
    return path if path is not None and path.is_file() else None


def default_initrd() -> Path | None:
    """The default guest initramfs (newc cpio), or None if not built."""
    manifest = read_manifest()
    return manifest.initrd if manifest and manifest.initrd.is_file() else None
