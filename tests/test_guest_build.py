"""Default guest build: input hashing, the manifest and how a run finds the guest through it
(also from a minivmm pip-installed elsewhere), the built config and the initramfs contents.

None of these tests builds a kernel. Those that need the built guest fail (never skip)
when it is missing, saying how to build it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minivmm import cli, guestimage, guestmanifest
from minivmm.errors import UserError
from minivmm.guestmanifest import GuestManifest

BUILD_HINT = "default guest not built: run `make guest` (minivmm guest build)"
REPO = Path(__file__).resolve().parent.parent


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


def _fake_guest(cache_home: Path, up: bool = True) -> GuestManifest:
    """Small files standing for a built guest, in ``cache_home``, and their manifest; without
    ``up``, as a build before the uniprocessor kernel recorded it."""
    built = cache_home / "elsewhere"
    built.mkdir(parents=True)
    for name in ("vmlinux", "bzImage", "vmlinux-up", "bzImage-up", "initrd.cpio.gz"):
        (built / name).write_bytes(name.encode())
    fake = GuestManifest(vmlinux=built / "vmlinux", bzimage=built / "bzImage",
                         initrd=built / "initrd.cpio.gz", kernel_hash="k" * 64,
                         initramfs_hash="i" * 64, built_at="2026-11-30T12:00:00+00:00",
                         sources="/nowhere/guest", versions={"gcc": "gcc 12"})
    if not up:
        return fake
    return dataclasses.replace(fake, vmlinux_up=built / "vmlinux-up", bzimage_up=built / "bzImage-up",
                               kernel_up_hash="u" * 64)


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``XDG_CACHE_HOME`` for this test (no manifest: nothing built)."""
    home = tmp_path / "cache-home"
    home.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


def _cpio_names(initrd: Path) -> set[str]:
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=guestimage.initramfs_archive(initrd),
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
    before_up = guestimage.kernel_hash(guest_copy, guestimage.UP_KERNEL)
    path = guest_copy / name
    path.write_text((path.read_text() if path.exists() else "") + "# changed\n")
    assert guestimage.kernel_hash(guest_copy) != before_k
    assert guestimage.kernel_hash(guest_copy, guestimage.UP_KERNEL) != before_up
    assert guestimage.initramfs_hash(guest_copy) == before_i


def test_up_kernel_hash_follows_its_overrides_only(guest_copy: Path) -> None:
    smp, up = (guestimage.kernel_hash(guest_copy, f) for f in guestimage.KERNEL_FLAVOURS)
    assert smp != up and guestimage.kernel_dir(guest_copy) != \
        guestimage.kernel_dir(guest_copy, guestimage.UP_KERNEL)
    with (guest_copy / "kernel-up.config").open("a") as f:
        f.write("# changed\n")
    assert guestimage.kernel_hash(guest_copy) == smp  # the SMP kernel stays cached
    assert guestimage.kernel_hash(guest_copy, guestimage.UP_KERNEL) != up


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
    assert guestimage.initramfs_path() == tmp_path / "minivmm" / f"initramfs-{i}.cpio"
    assert guestmanifest.manifest_path() == tmp_path / "minivmm" / "guest.json"
    assert guestimage.default_kernel() is None
    assert guestimage.default_kernel("bzImage") is None
    assert guestimage.default_kernel("vmlinux-up") is None
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


def test_later_fragment_overrides_earlier(tmp_path: Path) -> None:
    """As merge_config.sh merges them: the last line naming a symbol wins, either way."""
    base, override = tmp_path / "base", tmp_path / "override"
    base.write_text("CONFIG_A=y\nCONFIG_C=y\nCONFIG_N=4\n# CONFIG_D is not set\n")
    override.write_text("# CONFIG_C is not set\nCONFIG_N=1\nCONFIG_D=y\n")
    assert guestimage.fragment_settings([base, override]) == \
        {"CONFIG_A": "y", "CONFIG_C": "n", "CONFIG_N": "1", "CONFIG_D": "y"}
    assert guestimage.fragment_symbols([base, override]) == ["CONFIG_A", "CONFIG_D"]
    config = tmp_path / ".config"
    config.write_text("CONFIG_A=y\nCONFIG_N=1\n")
    assert guestimage.missing_symbols([base, override], config) == ["CONFIG_D"]
    config.write_text("CONFIG_A=y\nCONFIG_C=y\nCONFIG_D=y\n")
    assert guestimage.unwanted_symbols([base, override], config) == ["CONFIG_C"]


def _flavour_fragments(flavour: guestimage.KernelFlavour) -> list[Path]:
    return [guestimage.GUEST_DIR / name for name in flavour.fragments]


def test_up_flavour_is_the_smp_fragment_without_smp() -> None:
    smp = guestimage.fragment_settings(_flavour_fragments(guestimage.SMP_KERNEL))
    up = guestimage.fragment_settings(_flavour_fragments(guestimage.UP_KERNEL))
    assert (smp["CONFIG_SMP"], up["CONFIG_SMP"]) == ("y", "n")
    assert (int(smp["CONFIG_NR_CPUS"]), up["CONFIG_NR_CPUS"]) == (8, "1")
    # Nothing else differs: the overrides are a short list, not a second copy of the fragment.
    assert {s for s in smp.keys() | up.keys() if smp.get(s) != up.get(s)} == \
        {"CONFIG_SMP", "CONFIG_NR_CPUS"}


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


@pytest.mark.parametrize("flavour", guestimage.KERNEL_FLAVOURS, ids=lambda f: f.name)
def test_built_config_has_every_fragment_symbol(flavour: guestimage.KernelFlavour) -> None:
    vmlinux = guestimage.default_kernel("vmlinux" if flavour is guestimage.SMP_KERNEL else "vmlinux-up")
    if vmlinux is None:
        pytest.fail(BUILD_HINT)
    config = vmlinux.parent / "config"
    missing = guestimage.missing_symbols(_flavour_fragments(flavour), config)
    assert missing == [], f"not =y in {config}: {missing}"
    values = guestimage.config_values(config)
    assert values.get("CONFIG_MODULES") is None
    assert values.get("CONFIG_SMP") == ("y" if flavour is guestimage.SMP_KERNEL else None)


def test_built_kernel_artifacts() -> None:
    kdir = _built_kernel_dir()
    assert (kdir / "vmlinux").read_bytes()[:4] == b"\x7fELF"
    assert (kdir / "bzImage").read_bytes()[0x202:0x206] == b"HdrS"  # boot protocol magic


def test_vmlinux_has_pvh_entry_note() -> None:
    notes = subprocess.run(["readelf", "-n", str(_built_kernel_dir() / "vmlinux")],
                           capture_output=True, text=True, check=True).stdout
    assert "XEN_ELFNOTE_PHYS32_ENTRY" in notes or "Unknown note type: (0x00000012)" in notes


# What the guest runs by path (the #! of /init and the scripts, minivmm-test's execve, the
# selftest's fork-exec and pipe steps); every other applet runs by name, without a link.
APPLET_LINKS = {"bin/sh", "bin/true", "bin/cat", "bin/ls", "usr/bin/wc"}


def _cpio_symlinks(initrd: Path) -> dict[str, str]:
    """name -> target of every symlink in the archive (``cpio -tv``: ``... name -> target``)."""
    listing = subprocess.run(["cpio", "-tv", "--quiet"], input=guestimage.initramfs_archive(initrd),
                             capture_output=True, check=True)
    links = {}
    for line in listing.stdout.decode().splitlines():
        if line.startswith("l") and " -> " in line:
            name, target = line.split(None, 8)[8].split(" -> ")
            links[name.lstrip("./")] = target
    return links


def test_initramfs_contents() -> None:
    names = _cpio_names(_built_initrd())
    for name in ("init", "bin/busybox", "sbin/minivmm-test", "dev/console", "bin/sh",
                 "etc/minivmm/smoke.sh", *APPLET_LINKS):
        assert name in names, name
    # No link per applet: the standalone shell runs `mount`, `poweroff`... by name.
    for name in ("sbin/poweroff", "bin/mount", "bin/mkdir", "usr/bin/vi"):
        assert name not in names, name


def test_initramfs_links_only_what_runs_by_path() -> None:
    links = _cpio_symlinks(_built_initrd())
    assert links == {name: "/bin/busybox" for name in APPLET_LINKS}


def test_cpio_list_links_only_what_runs_by_path(guest_copy: Path, tmp_path: Path) -> None:
    lines = guestimage._cpio_list(guest_copy, tmp_path / "minivmm-test").splitlines()
    slinks = sorted(line.split()[1] for line in lines if line.startswith("slink "))
    assert slinks == sorted("/" + name for name in APPLET_LINKS)
    assert all(line.split()[2] == "/bin/busybox" for line in lines if line.startswith("slink "))


def test_initramfs_test_init_is_static(tmp_path: Path) -> None:
    subprocess.run(["cpio", "-id", "--quiet", "sbin/minivmm-test", "init"],
                   input=guestimage.initramfs_archive(_built_initrd()), cwd=tmp_path, check=True)
    assert guestimage.is_static_elf(tmp_path / "sbin/minivmm-test")
    assert (tmp_path / "init").read_text().startswith("#!/bin/sh")


def test_test_init_steps_from_a_shell(tmp_path: Path) -> None:
    # Not pid 1: it neither mounts nor writes /dev/kmsg nor ends the machine, and
    # takes its steps from argv, so it is safe to run on the host.
    subprocess.run(["cpio", "-id", "--quiet", "sbin/minivmm-test"],
                   input=guestimage.initramfs_archive(_built_initrd()), cwd=tmp_path, check=True)
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
    assert not guestimage.kernel_dir().exists()  # no cached kernel matches: a build would run


def test_unwanted_symbols_names_ones_left_on(tmp_path: Path) -> None:
    fragment = tmp_path / "frag"
    fragment.write_text("# CONFIG_A is not set\n# CONFIG_B is not set\n")
    config = tmp_path / ".config"
    config.write_text("CONFIG_A=y\n# CONFIG_B is not set\n")
    assert guestimage.unwanted_symbols(fragment, config) == ["CONFIG_A"]


# ---- the manifest: the build writes it, a run only reads it


def test_manifest_round_trip(cache_home: Path) -> None:
    fake = _fake_guest(cache_home)
    path = guestmanifest.write_manifest(fake)
    assert path == cache_home / "minivmm" / "guest.json"
    data = json.loads(path.read_text())
    assert data["format"] == 1 and data["bzImage"] == str(fake.bzimage)
    assert guestmanifest.read_manifest() == fake
    assert guestmanifest.default_guest() == fake
    assert guestmanifest.default_kernel() == fake.vmlinux
    assert guestmanifest.default_kernel("bzImage") == fake.bzimage
    assert guestmanifest.default_kernel("vmlinux-up") == fake.vmlinux_up
    assert guestmanifest.default_kernel("bzImage-up") == fake.bzimage_up
    assert guestmanifest.default_initrd() == fake.initrd
    assert (data["vmlinux-up"], data["kernel_up_hash"]) == (str(fake.vmlinux_up), "u" * 64)
    assert fake.describe().splitlines() == [
        f"vmlinux: {fake.vmlinux}", f"bzImage: {fake.bzimage}", f"vmlinux-up: {fake.vmlinux_up}",
        f"bzImage-up: {fake.bzimage_up}", f"initrd: {fake.initrd}",
        "built: 2026-11-30T12:00:00+00:00 from /nowhere/guest (gcc: gcc 12)"]
    # Relative paths are relative to the manifest's directory (a moved cache still works).
    data.update(vmlinux="elsewhere/vmlinux")
    assert GuestManifest.from_json(json.dumps(data), cache_home).vmlinux == fake.vmlinux


def test_not_built_is_one_line_user_error(cache_home: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert guestmanifest.read_manifest() is None
    assert guestmanifest.default_kernel() is None and guestmanifest.default_initrd() is None
    for argv in (["run"], ["guest", "paths"]):
        assert cli.main(argv) == 2
        out, err = capsys.readouterr()
        assert (out, err) == ("", f"minivmm: error: {guestmanifest.NOT_BUILT}\n")
        assert "make guest" in err


def test_manifest_naming_a_missing_file_is_not_built(cache_home: Path) -> None:
    fake = _fake_guest(cache_home)
    guestmanifest.write_manifest(fake)
    fake.initrd.unlink()
    with pytest.raises(UserError) as err:
        guestmanifest.default_guest()
    assert str(err.value).startswith(guestmanifest.NOT_BUILT)
    assert str(fake.initrd) in str(err.value) and "\n" not in str(err.value)
    assert guestmanifest.default_initrd() is None
    assert guestmanifest.default_kernel() == fake.vmlinux


@pytest.mark.parametrize("text", ["{", "[]", '{"format": 1}', '{"format": 99}'])
def test_malformed_manifest_is_user_error(cache_home: Path, text: str) -> None:
    guestmanifest.manifest_path().parent.mkdir(parents=True)
    guestmanifest.manifest_path().write_text(text)
    with pytest.raises(UserError, match=r"guest\.json: .*run `make guest` again$"):
        guestmanifest.default_guest()


def test_run_reads_the_manifest_only(cache_home: Path) -> None:
    """`minivmm run` finds the guest without hashing, running a tool or importing the builder:
    in a fresh interpreter whose PATH holds no program at all."""
    fake = _fake_guest(cache_home)
    guestmanifest.write_manifest(fake)
    probe = ("import sys\n"
             "from minivmm import cli\n"
             "print(*cli._default_guest(cli.build_parser().parse_args(['run'])))\n"
             "print('minivmm.guestimage' in sys.modules, 'subprocess' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=str(cache_home))
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{fake.vmlinux_up} {fake.initrd}", "False False"]


def _run_guest(*argv: str) -> tuple[Path, Path | None]:
    return cli._default_guest(cli.build_parser().parse_args(["run", *argv]))


def test_run_boots_the_up_kernel_on_one_cpu_and_smp_on_more(cache_home: Path) -> None:
    fake = _fake_guest(cache_home)
    guestmanifest.write_manifest(fake)
    assert _run_guest() == (fake.vmlinux_up, fake.initrd)  # --cpus 1 is the default
    assert _run_guest("--cpus", "1") == (fake.vmlinux_up, fake.initrd)
    for cpus in ("2", "8"):
        assert _run_guest("--cpus", cpus) == (fake.vmlinux, fake.initrd)
    # An explicit kernel is booted as given, whatever --cpus says.
    own = cache_home / "my-vmlinux"
    assert _run_guest("--kernel", str(own)) == (own, None)
    assert _run_guest("--kernel", str(fake.vmlinux), "--cpus", "1") == (fake.vmlinux, None)
    assert _run_guest("--kernel", str(fake.vmlinux_up), "--cpus", "2") == (fake.vmlinux_up, None)


def test_manifest_without_up_kernel_boots_its_smp_kernel(cache_home: Path) -> None:
    """A manifest written before the uniprocessor kernel existed still reads, and boots its
    one (SMP) kernel for any --cpus until `make guest` runs again."""
    fake = _fake_guest(cache_home, up=False)
    path = guestmanifest.write_manifest(fake)
    data = json.loads(path.read_text())
    assert not {"vmlinux-up", "bzImage-up", "kernel_up_hash"} & data.keys()
    assert guestmanifest.read_manifest() == fake
    assert guestmanifest.default_kernel("vmlinux-up") is None
    assert _run_guest() == (fake.vmlinux, fake.initrd)
    assert _run_guest("--cpus", "2") == (fake.vmlinux, fake.initrd)


def test_manifest_naming_a_missing_up_kernel_is_not_built(cache_home: Path) -> None:
    fake = _fake_guest(cache_home)
    guestmanifest.write_manifest(fake)
    assert fake.bzimage_up is not None
    fake.bzimage_up.unlink()
    with pytest.raises(UserError) as err:
        guestmanifest.default_guest()
    assert str(err.value).startswith(guestmanifest.NOT_BUILT) and str(fake.bzimage_up) in str(err.value)


def test_build_writes_the_manifest(guest_copy: Path, cache_home: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What build() records, with the two build steps stood in for by their cache paths."""
    monkeypatch.setattr(guestimage, "build_kernel",
                        lambda force, guest, flavour: guestimage.kernel_dir(guest, flavour))
    monkeypatch.setattr(guestimage, "build_initramfs",
                        lambda force, guest: guestimage.initramfs_path(guest))
    manifest = guestimage.build(guest=guest_copy)
    assert guestmanifest.read_manifest() == manifest
    kernel = cache_home / "minivmm" / f"kernel-{guestimage.kernel_hash(guest_copy)[:16]}"
    assert (manifest.vmlinux, manifest.bzimage) == (kernel / "vmlinux", kernel / "bzImage")
    up = guestimage.kernel_hash(guest_copy, guestimage.UP_KERNEL)
    kernel_up = cache_home / "minivmm" / f"kernel-{up[:16]}"
    assert kernel_up != kernel
    assert (manifest.vmlinux_up, manifest.bzimage_up) == (kernel_up / "vmlinux", kernel_up / "bzImage")
    assert manifest.kernel_up_hash == up
    assert manifest.initrd == guestimage.initramfs_path(guest_copy)
    assert manifest.kernel_hash == guestimage.kernel_hash(guest_copy)
    assert manifest.initramfs_hash == guestimage.initramfs_hash(guest_copy)
    assert manifest.sources == str(guest_copy)
    assert manifest.versions == {"linux": guestimage.linux_source_version(),
                                 "gcc": guestimage.gcc_version(),
                                 "busybox": guestimage.busybox_version()}
    # A changed input builds (and records) another cache entry.
    (guest_copy / "init.sh").write_text("#!/bin/sh\n")
    assert guestimage.build(guest=guest_copy).initrd != manifest.initrd


def test_build_without_sources_is_user_error(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guestimage, "GUEST_DIR", tmp_path / "site-packages" / "guest")
    with pytest.raises(UserError, match=r"^no guest sources at .*: build .* with `make guest`$"):
        guestimage.build()


def test_prune_keeps_the_current_and_the_manifests(guest_copy: Path, cache_home: Path) -> None:
    cache = cache_home / "minivmm"
    current_kernel, current_initrd = guestimage.kernel_dir(guest_copy), guestimage.initramfs_path(guest_copy)
    current_up = guestimage.kernel_dir(guest_copy, guestimage.UP_KERNEL)
    other_checkout = GuestManifest(
        vmlinux=cache / "kernel-0000000000000001" / "vmlinux",
        bzimage=cache / "kernel-0000000000000001" / "bzImage",
        initrd=cache / "initramfs-0000000000000001.cpio.gz",
        kernel_hash="1", initramfs_hash="1", built_at="x", sources="/other/guest",
        vmlinux_up=cache / "kernel-0000000000000003" / "vmlinux",
        bzimage_up=cache / "kernel-0000000000000003" / "bzImage", kernel_up_hash="3")
    old = [cache / "kernel-0000000000000002", cache / "initramfs-0000000000000002.cpio.gz",
           cache / "logs" / "kernel-0000000000000002.log"]
    kept = [current_kernel, current_up, current_initrd, other_checkout.vmlinux.parent,
            other_checkout.vmlinux_up.parent, other_checkout.initrd,
            cache / "logs" / f"{current_kernel.name}.log", cache / "logs" / "initramfs-0000000000000001.log"]
    (cache / "logs").mkdir(parents=True)
    for path in old + kept:
        if path.name.startswith("kernel-") and not path.name.endswith(".log"):
            path.mkdir()
        else:
            path.write_text("")
    guestmanifest.write_manifest(other_checkout)
    assert sorted(guestimage.prune(guest_copy)) == sorted(old)
    assert all(path.exists() for path in kept)


def test_python_m_guestimage_is_the_guest_command(cache_home: Path) -> None:
    """One command-line definition: `python -m minivmm.guestimage ARGS` is `minivmm guest ARGS`."""
    guestmanifest.write_manifest(_fake_guest(cache_home))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    runs = [subprocess.run([sys.executable, "-m", *prefix, *args], env=env, capture_output=True,
                           text=True, timeout=60)
            for args in (["paths"], ["--help"], ["bogus"])
            for prefix in (["minivmm", "guest"], ["minivmm.guestimage"])]
    for via_cli, via_module in zip(runs[::2], runs[1::2]):
        assert (via_module.returncode, via_module.stdout, via_module.stderr) == \
            (via_cli.returncode, via_cli.stdout, via_cli.stderr)
    assert runs[0].returncode == 0 and runs[0].stdout.startswith("vmlinux: ")
    assert "build,paths,prune" in runs[2].stdout and "--force" in runs[2].stdout
    assert runs[4].returncode == 2 and "invalid choice: 'bogus'" in runs[4].stderr


def test_built_guest_is_current() -> None:
    """The manifest names the guest built from this checkout's guest/ (else the boot tests
    would boot another one): `make guest` here updates it."""
    manifest = guestmanifest.read_manifest()
    if manifest is None:
        pytest.fail(BUILD_HINT)
    assert (manifest.kernel_hash, manifest.kernel_up_hash, manifest.initramfs_hash) == \
        (guestimage.kernel_hash(), guestimage.kernel_hash(None, guestimage.UP_KERNEL),
         guestimage.initramfs_hash()), \
        f"{guestmanifest.manifest_path()} names a guest built from {manifest.sources}, not from " \
        f"this checkout's guest/: run `make guest`"


# ---- a minivmm installed elsewhere finds the guest a checkout built


# Builds a wheel offline from the base environment: pip, setuptools, and bdist_wheel (from
# `wheel`, or setuptools >= 70.1 which carries it).
_CAN_BUILD_WHEELS = ("import setuptools, pip, sys\n"
                     "try:\n    import wheel\n"
                     "except ImportError:\n"
                     "    v = tuple(int(x) for x in setuptools.__version__.split('.')[:2])\n"
                     "    sys.exit(v < (70, 1))\n")


def _installer_python() -> str:
    """An interpreter (>= 3.11) whose own site-packages can ``pip install .`` offline: the one
    this venv was made from, else Debian's (python3-pip, python3-wheel)."""
    base = getattr(sys, "_base_executable", sys.executable)
    for python in dict.fromkeys([base, os.path.realpath(sys.executable), "/usr/bin/python3"]):
        probe = subprocess.run([python, "-I", "-c", "import sys; assert sys.version_info >= (3, 11)\n"
                                + _CAN_BUILD_WHEELS], capture_output=True, timeout=60, check=False)
        if probe.returncode == 0:
            return python
    pytest.fail("no interpreter can pip-install minivmm offline: apt-get install python3-pip python3-wheel")


def _pip_install_elsewhere(tmp_path: Path) -> Path:
    """``pip install .`` of a copy of this checkout without guest/ into a fresh venv; its bin/."""
    src = tmp_path / "src"  # a copy: pip's in-tree build must not write into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "minivmm", src / "minivmm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    # The base interpreter's site-packages provide pip and setuptools, offline.
    subprocess.run([_installer_python(), "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "--no-index", str(src)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    shutil.rmtree(src)  # nothing of the checkout is left to find
    return venv / "bin"


def test_pip_installed_minivmm_finds_the_guest(tmp_path: Path) -> None:
    bin_dir = _pip_install_elsewhere(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}

    def installed(*args: str, cache_home: Path | None = None) -> subprocess.CompletedProcess[str]:
        run_env = env if cache_home is None else dict(env, XDG_CACHE_HOME=str(cache_home))
        return subprocess.run([str(bin_dir / "minivmm"), *args], env=run_env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    where = subprocess.run([str(bin_dir / "python"), "-c", "import minivmm; print(minivmm.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(tmp_path / "venv")), where.stdout  # the installed copy

    # A guest built for this user (a fake one in a private cache): found, whatever the package path.
    fake_home = tmp_path / "cache-home"
    fake = _fake_guest(fake_home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(fake_home))
        guestmanifest.write_manifest(fake)
    paths = installed("guest", "paths", cache_home=fake_home)
    assert (paths.returncode, paths.stderr) == (0, ""), paths.stderr
    assert paths.stdout == fake.describe() + "\n"
    # `minivmm run`'s lookup, in the installed package (a boot would need cffi, which this
    # environment need not have: pip installed no dependency).
    lookup = subprocess.run(
        [str(bin_dir / "python"), "-c", "from minivmm import cli\n"
         "print(*cli._default_guest(cli.build_parser().parse_args(['run'])))"],
        env=dict(env, XDG_CACHE_HOME=str(fake_home)), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (lookup.returncode, lookup.stdout) == (0, f"{fake.vmlinux_up} {fake.initrd}\n"), lookup.stderr
    # Nothing built: the one-line error.
    empty_home = tmp_path / "empty-home"
    missing = installed("guest", "paths", cache_home=empty_home)
    assert (missing.returncode, missing.stdout) == (2, "")
    assert missing.stderr == f"minivmm: error: {guestmanifest.NOT_BUILT}\n"
    # No sources next to the installed package: building says where to build.
    build = installed("guest", "build", cache_home=empty_home)
    assert build.returncode == 2 and build.stderr.startswith("minivmm: error: no guest sources at ")

    # The real default guest, when `make guest` has built it: the installed minivmm sees it too.
    real = guestmanifest.read_manifest()
    if real is not None:
        seen = installed("guest", "paths")
        assert (seen.returncode, seen.stdout) == (0, real.describe() + "\n"), seen.stderr


def test_initramfs_archive_reads_plain_and_gzipped(tmp_path: Path) -> None:
    """The build stores the newc archive uncompressed; an older build's (or a user's) gzip'd
    one reads the same."""
    archive = b"070701" + b"0" * 104 + b"TRAILER!!!\0\0"
    plain, packed = tmp_path / "initramfs.cpio", tmp_path / "initramfs.cpio.gz"
    plain.write_bytes(archive)
    packed.write_bytes(gzip.compress(archive, compresslevel=0))
    assert guestimage.initramfs_archive(plain) == archive
    assert guestimage.initramfs_archive(packed) == archive
    assert guestimage.initramfs_path().name.endswith(".cpio")
