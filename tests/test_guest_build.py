"""Default guest build: input hashing, the built config and the initramfs contents.

None of these tests builds a kernel. Those that need the built guest fail (never skip)
when it is missing, saying how to build it.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from minivmm import guestimage
from minivmm.errors import UserError

BUILD_HINT = "default guest not built: run `make guest` (python -m minivmm.guestimage build)"


@pytest.fixture
def guest_copy(tmp_path: Path) -> Path:
    """A private copy of guest/ whose files a test may change."""
    copy = tmp_path / "guest"
    shutil.copytree(guestimage.GUEST_DIR, copy)
    return copy


def _built_kernel_dir() -> Path:
    vmlinux = guestimage.default_kernel("vmlinux")
    if vmlinux is None:
        pytest.fail(BUILD_HINT)
    return vmlinux.parent


def _built_initrd() -> Path:
    initrd = guestimage.default_initrd()
    if initrd is None:
        pytest.fail(BUILD_HINT)
    return initrd


def _cpio_names(initrd: Path) -> set[str]:
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=gzip.decompress(initrd.read_bytes()),
                             capture_output=True, check=True)
    return {name.lstrip("./") for name in listing.stdout.decode().splitlines()}


# ---- hashing: no build needed


def test_hashes_are_stable(guest_copy: Path) -> None:
    assert guestimage.kernel_hash(guest_copy) == guestimage.kernel_hash(guest_copy)
    assert guestimage.initramfs_hash(guest_copy) == guestimage.initramfs_hash(guest_copy)
    # A copy elsewhere hashes like the original: paths are relative to guest/.
    assert guestimage.kernel_hash(guest_copy) == guestimage.kernel_hash(guestimage.GUEST_DIR)


@pytest.mark.parametrize("name", ["kernel.config", "patches/0001-extra.patch"])
def test_kernel_hash_follows_kernel_inputs(guest_copy: Path, name: str) -> None:
    before_k, before_i = guestimage.kernel_hash(guest_copy), guestimage.initramfs_hash(guest_copy)
    path = guest_copy / name
    path.write_text((path.read_text() if path.exists() else "") + "# changed\n")
    assert guestimage.kernel_hash(guest_copy) != before_k
    assert guestimage.initramfs_hash(guest_copy) == before_i


@pytest.mark.parametrize("name", ["init.sh", "testinit/minivmm-test.c", "scripts/new.sh"])
def test_initramfs_hash_follows_initramfs_inputs(guest_copy: Path, name: str) -> None:
    before_k, before_i = guestimage.kernel_hash(guest_copy), guestimage.initramfs_hash(guest_copy)
    path = guest_copy / name
    path.write_text((path.read_text() if path.exists() else "") + "# changed\n")
    assert guestimage.initramfs_hash(guest_copy) != before_i
    assert guestimage.kernel_hash(guest_copy) == before_k


def test_hash_follows_tool_versions(guest_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before_k, before_i = guestimage.kernel_hash(guest_copy), guestimage.initramfs_hash(guest_copy)
    monkeypatch.setattr(guestimage, "gcc_version", lambda: "gcc (Other) 99")
    assert guestimage.kernel_hash(guest_copy) != before_k
    assert guestimage.initramfs_hash(guest_copy) != before_i


def test_cache_paths_follow_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    k = guestimage.kernel_hash()[:16]
    assert guestimage.kernel_dir() == tmp_path / "minivmm" / f"kernel-{k}"
    i = guestimage.initramfs_hash()[:16]
    assert guestimage.initramfs_path() == tmp_path / "minivmm" / f"initramfs-{i}.cpio.gz"
    assert guestimage.default_kernel() is None
    assert guestimage.default_kernel("bzImage") is None
    assert guestimage.default_initrd() is None
    with pytest.raises(ValueError):
        guestimage.default_kernel("zImage")


def test_missing_tool_is_one_line_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guestimage.shutil, "which", lambda tool: None if tool == "flex" else "/x")
    with pytest.raises(UserError) as err:
        guestimage._check_tools({"flex": "flex", "make": "make"}, {})
    assert str(err.value) == "guest build needs missing packages: apt-get install flex"


def test_missing_symbols_names_dropped_ones(tmp_path: Path) -> None:
    fragment = tmp_path / "frag"
    fragment.write_text("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_N=4\n")
    config = tmp_path / ".config"
    config.write_text("CONFIG_A=y\n# CONFIG_C is not set\nCONFIG_N=4\n")
    assert guestimage.fragment_symbols(fragment) == ["CONFIG_A", "CONFIG_C"]
    assert guestimage.missing_symbols(fragment, config) == ["CONFIG_C"]


def test_fragment_has_the_essentials() -> None:
    wanted = set(guestimage.fragment_symbols(guestimage.GUEST_DIR / "kernel.config"))
    for sym in ("PVH", "KVM_GUEST", "SERIAL_8250_CONSOLE", "ACPI", "PVPANIC_MMIO",
                "VIRTIO_PCI", "VIRTIO_PMEM", "BLK_DEV_PMEM", "FS_DAX", "EXT4_FS",
                "BLK_DEV_INITRD", "RD_GZIP", "DEVTMPFS", "UNIX"):
        assert f"CONFIG_{sym}" in wanted, sym


def test_is_static_elf(tmp_path: Path) -> None:
    assert not guestimage.is_static_elf(Path("/bin/sh"))  # dynamic on Debian
    junk = tmp_path / "junk"
    junk.write_bytes(b"#!/bin/sh\n")
    assert not guestimage.is_static_elf(junk)


# ---- the built guest: fail with the build hint when missing


def test_built_config_has_every_fragment_symbol() -> None:
    config = _built_kernel_dir() / "config"
    missing = guestimage.missing_symbols(guestimage.GUEST_DIR / "kernel.config", config)
    assert missing == [], f"not =y in {config}: {missing}"
    values = guestimage.config_values(config)
    assert values.get("CONFIG_MODULES") is None


def test_built_kernel_artifacts() -> None:
    kdir = _built_kernel_dir()
    assert (kdir / "vmlinux").read_bytes()[:4] == b"\x7fELF"
    assert (kdir / "bzImage").read_bytes()[0x202:0x206] == b"HdrS"  # boot protocol magic


def test_vmlinux_has_pvh_entry_note() -> None:
    notes = subprocess.run(["readelf", "-n", str(_built_kernel_dir() / "vmlinux")],
                           capture_output=True, text=True, check=True).stdout
    assert "XEN_ELFNOTE_PHYS32_ENTRY" in notes or "Unknown note type: (0x00000012)" in notes


def test_initramfs_contents() -> None:
    names = _cpio_names(_built_initrd())
    for name in ("init", "bin/busybox", "sbin/minivmm-test", "dev/console", "bin/sh",
                 "sbin/poweroff", "bin/mount", "etc/minivmm/smoke.sh"):
        assert name in names, name


def test_initramfs_test_init_is_static(tmp_path: Path) -> None:
    subprocess.run(["cpio", "-id", "--quiet", "sbin/minivmm-test", "init"],
                   input=gzip.decompress(_built_initrd().read_bytes()), cwd=tmp_path, check=True)
    assert guestimage.is_static_elf(tmp_path / "sbin/minivmm-test")
    assert (tmp_path / "init").read_text().startswith("#!/bin/sh")


def test_test_init_steps_from_a_shell(tmp_path: Path) -> None:
    # Not pid 1: it neither mounts nor writes /dev/kmsg nor ends the machine, and
    # takes its steps from argv, so it is safe to run on the host.
    subprocess.run(["cpio", "-id", "--quiet", "sbin/minivmm-test"],
                   input=gzip.decompress(_built_initrd().read_bytes()), cwd=tmp_path, check=True)
    run = subprocess.run([str(tmp_path / "sbin/minivmm-test"), "hello,getpid10", "uname",
                          "bogus", "end:reboot"], capture_output=True, text=True, timeout=30)
    lines = run.stdout.splitlines()
    assert run.returncode == 1  # one failed step
    assert lines[0].startswith("minivmm-test: start pid=")
    assert lines[1].startswith("minivmm-test: hello pid=")
    assert lines[2].startswith("minivmm-test: getpid n=10 total_ns=")
    assert lines[3].startswith("minivmm-test: uname sysname=Linux ")
    assert lines[4] == "minivmm-test: unknown step 'bogus'"
    assert lines[5:] == ["minivmm-test: done ok=3 failed=1", "minivmm-test: end action=reboot"]


def test_without_kernel_source_nothing_is_current(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guestimage, "_dpkg_version", lambda package: None)
    monkeypatch.setattr(guestimage, "LINUX_TARBALL", tmp_path / "absent.tar.xz")
    assert guestimage.linux_source_version() == "missing"
    assert guestimage.default_kernel() is None


def test_unwanted_symbols_names_ones_left_on(tmp_path: Path) -> None:
    fragment = tmp_path / "frag"
    fragment.write_text("# CONFIG_A is not set\n# CONFIG_B is not set\n")
    config = tmp_path / ".config"
    config.write_text("CONFIG_A=y\n# CONFIG_B is not set\n")
    assert guestimage.unwanted_symbols(fragment, config) == ["CONFIG_A"]
