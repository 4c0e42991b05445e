"""The command line's error paths, run as a user runs them: `python -m minivmm ...` in a subprocess.

Every mistake a user can make is exactly one line on stderr (``minivmm: error: ...``, or
``minivmm run: error: ...`` from the option parser): no traceback, no usage block, no other
chatter, exit status 2. No test here boots a guest; each needs about a second. Some errors are
only found after /dev/kvm is opened and the kernel is being loaded: they must look the same.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from bootutil import TRACEBACK, cli
from support.runner import RunResult

from minivmm import __version__
from minivmm.units import parse_size

MiB = 1 << 20
ONE_ERROR_LINE = re.compile(r"^minivmm(?: run| guest)?: error: \S.*$")


def assert_user_error(run: RunResult, pattern: str | None = None) -> str:
    """Exit status 2 and exactly one `... error: ...` line on stderr (matching `pattern`)."""
    lines = run.stderr.splitlines()
    assert TRACEBACK not in run.stderr, run.describe()
    assert "usage:" not in run.stderr, run.describe()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}\n{run.describe()}"
    assert ONE_ERROR_LINE.match(lines[0]), run.describe()
    if pattern is not None:
        assert re.search(pattern, lines[0], re.IGNORECASE), f"stderr does not match {pattern!r}\n{run.describe()}"
    assert run.status == 2, run.describe()
    assert run.stdout == "", run.describe()  # no guest ran, nothing reached the console
    return lines[0]


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["run", "--bogus"], r"unrecognized arguments: --bogus"),
        (["run", "extra-argument"], r"unrecognized arguments: extra-argument"),
        (["--bogus"], r"--bogus|required"),  # argparse reports the missing subcommand first
        (["frobnicate"], r"invalid choice: 'frobnicate'"),
        ([], r"required"),  # no subcommand
        (["run", "--mem"], r"--mem.*expected one argument"),
        (["run", "--cpus", "9"], r"--cpus: '9' is not a number of vCPUs from 1 to 8"),
        (["run", "--cpus", "0"], r"--cpus: '0' is not a number of vCPUs from 1 to 8"),
        (["run", "--cpus", "two"], r"--cpus: 'two' is not a number of vCPUs from 1 to 8"),
        (["run", "--watchdog", "soon"], r"--watchdog.*invalid float value"),
        (["guest", "destroy"], r"invalid choice: 'destroy'"),
        (["run", "--boot", "bios"], r"--boot: invalid choice: 'bios' \(choose from 'linux', 'pvh'\)"),
        (["run", "--boot"], r"--boot.*expected one argument"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_option(args, pattern, tmp_path):
    assert_user_error(cli(*args, workdir=tmp_path), pattern)


def test_boot_options_are_the_loaders_choices() -> None:
    """--boot offers exactly `boot.BOOT_CHOICES`, the default (linux) first."""
    from minivmm.boot import BOOT_CHOICES, BootProtocol
    from minivmm.cli import BOOT_OPTIONS, build_parser

    assert BOOT_OPTIONS == [p.value for p in BOOT_CHOICES] and BOOT_CHOICES[0] is BootProtocol.LINUX
    run = build_parser().parse_args(["run"])
    assert run.boot == "linux" and build_parser().parse_args(["run", "--boot", "pvh"]).boot == "pvh"


def test_bzimage_with_boot_pvh(guest, tmp_path):
    line = assert_user_error(cli("run", "--kernel", guest.bzimage, "--boot", "pvh", workdir=tmp_path))
    assert line.endswith(f"kernel {guest.bzimage}: a bzImage has no PVH entry; boot it with --boot linux")


@pytest.mark.parametrize(
    "mem, pattern",
    [
        ("12X", r"--mem.*bad size '12X'"),
        ("-1", r"--mem.*bad size '-1'"),
        ("1.5G", r"--mem.*bad size '1.5G'"),
        ("", r"--mem.*bad size"),
        ("0", r"memory size .*too small"),
        ("8M", r"memory size 8 MiB is too small"),
        ("16M-1", r"--mem.*bad size"),
        ("16777217", r"memory size .*not a multiple of 4 KiB"),  # 16 MiB + 1 byte
        ("1T", r"memory size .*does not fit.*guest physical address limit"),
        ("600G", r"memory size .*does not fit.*guest physical address limit"),
    ],
)
def test_bad_mem(mem, pattern, guest, tmp_path):
    assert_user_error(cli("run", "--kernel", guest.vmlinux, "--mem", mem, workdir=tmp_path), pattern)


def test_mem_equals_negative(guest, tmp_path):
    """`--mem=-1` (no separate argument for argparse to mistake for an option)."""
    assert_user_error(cli("run", "--kernel", guest.vmlinux, "--mem=-1", workdir=tmp_path), r"--mem.*bad size '-1'")


def test_mem_larger_than_the_host(tmp_path):
    """100 GiB fits the guest map (check_mem_size accepts it) but not this host's RAM. Guest
    RAM is meant to be reserved lazily (MAP_NORESERVE), so the run should get as far as the
    kernel (random bytes here: a one-line UserError); if the host refuses the reservation,
    that too must be one line, not a traceback."""
    kernel = tmp_path / "random-kernel"
    kernel.write_bytes(os.urandom(64 * 1024))
    run = cli("run", "--kernel", kernel, "--mem", "100G", workdir=tmp_path)
    assert TRACEBACK not in run.stderr, run.describe()
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and ONE_ERROR_LINE.match(lines[0]), run.describe()
    if "random-kernel" in lines[0]:
        assert run.status == 2, run.describe()
    else:  # could not reserve guest RAM: the user's choice (2) or the host's limit (1)
        assert run.status in (1, 2) and re.search(r"memory|RAM|--mem", lines[0]), run.describe()


@pytest.mark.parametrize("seconds", ["0", "-1", "-0.5", "0.0"])
def test_watchdog_not_positive(seconds, guest, tmp_path):
    run = cli("run", "--kernel", guest.vmlinux, f"--watchdog={seconds}", workdir=tmp_path)
    assert_user_error(run, r"--watchdog must be a positive number")


# ---------------------------------------------------------------- kernel and initrd files


def test_kernel_missing(tmp_path):
    missing = tmp_path / "no-such-vmlinux"
    assert_user_error(cli("run", "--kernel", missing, workdir=tmp_path), rf"kernel {re.escape(str(missing))}\b.*no such file")


def test_kernel_is_a_directory(tmp_path):
    assert_user_error(cli("run", "--kernel", tmp_path, workdir=tmp_path), rf"kernel {re.escape(str(tmp_path))}")


def test_kernel_random_bytes(tmp_path):
    kernel = tmp_path / "random-kernel"
    kernel.write_bytes(os.urandom(256 * 1024))
    assert_user_error(cli("run", "--kernel", kernel, workdir=tmp_path), rf"kernel {re.escape(str(kernel))}: .*(unknown format|not an ELF)")


def test_kernel_empty(tmp_path):
    kernel = tmp_path / "empty-kernel"
    kernel.write_bytes(b"")
    assert_user_error(cli("run", "--kernel", kernel, workdir=tmp_path), rf"kernel {re.escape(str(kernel))}: ")


def test_truncated_vmlinux(guest, tmp_path):
    kernel = tmp_path / "vmlinux-4k"
    with open(guest.vmlinux, "rb") as f:
        kernel.write_bytes(f.read(4096))
    assert_user_error(cli("run", "--kernel", kernel, workdir=tmp_path), rf"kernel {re.escape(str(kernel))}: .*truncated")


@pytest.mark.parametrize("length", [4096, 1 << 20])
def test_truncated_bzimage(length, guest, tmp_path):
    kernel = tmp_path / f"bzImage-{length}"
    with open(guest.bzimage, "rb") as f:
        kernel.write_bytes(f.read(length))
    assert_user_error(cli("run", "--kernel", kernel, workdir=tmp_path), rf"kernel {re.escape(str(kernel))}: .*truncated")


@pytest.mark.parametrize("kind", ["vmlinux", "bzimage"])
def test_initrd_missing(kind, guest, tmp_path):
    missing = tmp_path / "no-such-initrd"
    run = cli("run", "--kernel", getattr(guest, kind), "--initrd", missing, workdir=tmp_path)
    assert_user_error(run, rf"initrd {re.escape(str(missing))}\b.*no such file")


def test_initrd_missing_default_kernel(tmp_path):
    missing = tmp_path / "no-such-initrd"
    assert_user_error(cli("run", "--initrd", missing, workdir=tmp_path), rf"initrd {re.escape(str(missing))}\b.*no such file")


@pytest.mark.parametrize("kind", ["vmlinux", "bzimage"])
def test_initrd_too_large(kind, guest, tmp_path):
    initrd = tmp_path / "initrd-40M"
    with open(initrd, "wb") as f:
        f.truncate(40 * MiB)  # sparse
    run = cli("run", "--kernel", getattr(guest, kind), "--initrd", initrd, "--mem", "32M", workdir=tmp_path)
    assert_user_error(run, rf"initrd {re.escape(str(initrd))}: .*(do not fit|more memory)")


@pytest.mark.parametrize("kind", ["vmlinux", "bzimage"])
def test_cmdline_too_long(kind, guest, tmp_path):
    cmdline = "console=ttyS0 " + "x" * 4096
    run = cli("run", "--kernel", getattr(guest, kind), "--initrd", guest.initrd, "--cmdline", cmdline, workdir=tmp_path)
    assert_user_error(run, r"command line is too long")


def test_cmdline_too_long_append_alias(guest, tmp_path):
    run = cli("run", "--kernel", guest.vmlinux, "--append", "y" * 5000, workdir=tmp_path)
    assert_user_error(run, r"command line is too long")


# ---------------------------------------------------------------- --pmem


def _snapshot(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_size, st.st_mtime_ns


@pytest.fixture
def pmem_file(tmp_path) -> Path:
    """An existing 4 MiB backing file with recognisable contents and an old mtime."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(4 * MiB))
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_123_456_789))
    return path


def test_pmem_new_file_needs_size(guest, tmp_path):
    new = tmp_path / "new.img"
    assert_user_error(cli("run", "--kernel", guest.vmlinux, "--pmem", new, workdir=tmp_path), rf"--pmem {re.escape(str(new))}: .*size=")
    assert not new.exists()


@pytest.mark.parametrize("size", ["3M", "1M", "2049K", "0"])
def test_pmem_size_not_multiple_of_2m(size, guest, tmp_path):
    new = tmp_path / "new.img"
    run = cli("run", "--kernel", guest.vmlinux, "--pmem", f"{new},size={size}", workdir=tmp_path)
    assert_user_error(run, r"--pmem .*multiple of 2M")
    assert not new.exists()


def test_pmem_size_not_multiple_of_2m_existing(pmem_file, guest, tmp_path):
    before = _snapshot(pmem_file)
    run = cli("run", "--kernel", guest.vmlinux, "--pmem", f"{pmem_file},size=5M", workdir=tmp_path)
    assert_user_error(run, r"--pmem .*multiple of 2M")
    assert _snapshot(pmem_file) == before


def test_pmem_directory(guest, tmp_path):
    d = tmp_path / "somedir"
    d.mkdir()
    run = cli("run", "--kernel", guest.vmlinux, "--pmem", f"{d},size=2M", workdir=tmp_path)
    assert_user_error(run, rf"--pmem {re.escape(str(d))}: is a directory")
    assert d.is_dir() and not any(d.iterdir())


def test_pmem_same_file_twice(pmem_file, guest, tmp_path):
    before = _snapshot(pmem_file)
    run = cli("run", "--kernel", guest.vmlinux, "--pmem", pmem_file, "--pmem", pmem_file, workdir=tmp_path)
    assert_user_error(run, r"same file")
    assert _snapshot(pmem_file) == before


def test_pmem_same_file_twice_through_a_link(pmem_file, guest, tmp_path):
    link = tmp_path / "link.img"
    link.symlink_to(pmem_file)
    before = _snapshot(pmem_file)
    run = cli("run", "--kernel", guest.vmlinux, "--pmem", pmem_file, "--pmem", f"{link},size=8M", workdir=tmp_path)
    assert_user_error(run, r"same file")
    assert _snapshot(pmem_file) == before  # in particular: not extended to 8 MiB


def test_pmem_same_new_file_twice(guest, tmp_path):
    new = tmp_path / "new.img"
    run = cli("run", "--kernel", guest.vmlinux, "--pmem", f"{new},size=2M", "--pmem", f"{new},size=2M", workdir=tmp_path)
    assert_user_error(run, r"same file")
    assert not new.exists()


def test_pmem_file_longer_than_size(pmem_file, guest, tmp_path):
    before = _snapshot(pmem_file)
    run = cli("run", "--kernel", guest.vmlinux, "--pmem", f"{pmem_file},size=2M", workdir=tmp_path)
    assert_user_error(run, rf"--pmem {re.escape(str(pmem_file))}: .*longer than size=2M")
    assert _snapshot(pmem_file) == before


def test_pmem_error_after_a_good_one_leaves_both_untouched(pmem_file, guest, tmp_path):
    """All or nothing: the first --pmem is fine (would be extended, and a new file created),
    the last one is wrong; nothing is created or extended."""
    new = tmp_path / "new.img"
    before = _snapshot(pmem_file)
    run = cli(
        "run", "--kernel", guest.vmlinux,
        "--pmem", f"{pmem_file},size=8M", "--pmem", f"{new},size=2M", "--pmem", f"{tmp_path},size=2M",
        workdir=tmp_path,
    )  # fmt: skip
    assert_user_error(run, r"is a directory")
    assert _snapshot(pmem_file) == before
    assert not new.exists()


@pytest.mark.parametrize(
    "option, pattern",
    [
        ("{f},size=12X", r"bad size '12X'"),
        ("{f},colour=blue", r"unknown option 'colour'"),
        ("{f},size", r"expected key=value"),
        ("{f},id=bad id", r"bad id"),
        ("{f},discard-writes=maybe", r"discard-writes must be on or off"),
        (",size=2M", r"empty path"),
    ],
)
def test_pmem_bad_option_text(option, pattern, pmem_file, guest, tmp_path):
    before = _snapshot(pmem_file)
    run = cli("run", "--kernel", guest.vmlinux, "--pmem", option.format(f=pmem_file), workdir=tmp_path)
    assert_user_error(run, pattern)
    assert _snapshot(pmem_file) == before


# ---------------------------------------------------------------- things that work


def test_run_help_lists_every_option(tmp_path):
    run = cli("run", "--help", workdir=tmp_path)
    assert run.status == 0, run.describe()
    assert run.stderr == "", run.describe()
    options = ("--kernel", "--initrd", "--cmdline", "--append", "--boot", "--mem", "--cpus", "--pmem", "--trace", "--stats", "--stats-json", "--timeline", "--watchdog", "--help")
    for option in options:
        assert re.search(rf"(^|[\s\[,]){re.escape(option)}\b", run.stdout), f"{option} missing from run --help\n{run.stdout}"


def test_top_level_help_lists_subcommands(tmp_path):
    run = cli("--help", workdir=tmp_path)
    assert run.status == 0 and run.stderr == "", run.describe()
    assert "run" in run.stdout and "guest" in run.stdout and "--version" in run.stdout


def test_version(tmp_path):
    run = cli("--version", workdir=tmp_path)
    assert run.status == 0, run.describe()
    assert run.stdout.strip() == f"minivmm {__version__}", run.describe()
    assert run.stderr == ""


def test_guest_paths(guest, tmp_path):
    run = cli("guest", "paths", workdir=tmp_path)
    assert run.status == 0, run.describe()
    assert str(guest.vmlinux) in run.stdout and str(guest.bzimage) in run.stdout and str(guest.initrd) in run.stdout


def test_a_refused_run_leaves_no_pmem_file_created_or_extended(pmem_file, guest, tmp_path):
    """Files are checked and created before the machine is built; a later refusal (RAM too
    small here) removes what was created and cuts what was extended back, times included."""
    new = tmp_path / "new.img"
    before = _snapshot(pmem_file)
    run = cli("run", "--kernel", guest.vmlinux, "--mem", "1M", "--pmem", f"{new},size=2M",
              "--pmem", f"{pmem_file},size=8M", workdir=tmp_path)  # fmt: skip
    assert_user_error(run, r"memory size 1 MiB is too small")
    assert not new.exists()
    assert _snapshot(pmem_file) == before


def test_more_pmem_devices_than_pci_slots_is_one_line_and_leaves_no_file(guest, tmp_path):
    paths = [tmp_path / f"p{i}.img" for i in range(32)]  # 31 free slots on bus 0
    args = [a for p in paths for a in ("--pmem", f"{p},size=2M")]
    run = cli("run", "--kernel", guest.vmlinux, *args, workdir=tmp_path)
    assert_user_error(run, r"pmem31: PCI bus 0 is full \(at most 31 devices\)")
    assert not any(p.exists() for p in paths)


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ("kernel", r"kernel .*garbage: not an ELF vmlinux or a bzImage"),
        ("profile-map", r"--profile-map .*empty.map: no function symbols"),
    ],
)
def test_bad_kernel_or_profile_map_refused_before_any_file(bad, pattern, pmem_file, guest, tmp_path):
    """Inputs read at boot are checked before a pmem file is created or grown, or a flush
    log truncated (new-user finding: each of them used to happen first)."""
    garbage, empty_map, new, log = tmp_path / "garbage", tmp_path / "empty.map", tmp_path / "new.img", tmp_path / "keep.log"
    garbage.write_bytes(bytes(range(256)) * 20)
    empty_map.write_text("")
    log.write_bytes(b"x" * 5000)
    before = _snapshot(pmem_file)
    kernel = garbage if bad == "kernel" else guest.vmlinux
    profile = ["--profile", "--profile-map", str(empty_map)] if bad == "profile-map" else []
    run = cli(
        "run", "--kernel", kernel, *profile,
        "--pmem", f"{pmem_file},size=8M,lose-unflushed=on,flush-log={log}", "--pmem", f"{new},size=2M",
        workdir=tmp_path,
    )  # fmt: skip
    assert_user_error(run, pattern)
    assert _snapshot(pmem_file) == before and not new.exists() and log.read_bytes() == b"x" * 5000


# ---------------------------------------------------------------- --pmem: the whole plan before any file


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--mem", "1M"], r"memory size 1 MiB is too small"),  # the example
        (["--mem", "0"], r"memory size 0 MiB is too small"),
        (["--mem", "99999999999999999999G"], r"memory size .* does not fit below the 39-bit"),
        (["--mem", "16M"], r"the guest needs 33 MiB of RAM for the page structures of 2056M of pmem .*; give --mem 65 MiB or more$"),
    ],
    ids=["mem-1M", "mem-0", "mem-huge", "memmap"],
)
def test_pmem_plan_refused_before_any_file(extra, pattern, pmem_file, guest, tmp_path):
    """A refused run creates no file and extends none, whatever check refuses it."""
    new = tmp_path / "new.img"
    before = _snapshot(pmem_file)
    run = cli(
        "run", "--kernel", guest.vmlinux, *extra,
        "--pmem", f"{pmem_file},size=8M", "--pmem", f"{new},size={'2G' if extra[1] == '16M' else '2M'}",
        workdir=tmp_path,
    )  # fmt: skip
    assert_user_error(run, pattern)
    assert _snapshot(pmem_file) == before  # not extended to 8 MiB
    assert not new.exists()


@pytest.mark.parametrize(
    "size, pattern",
    [
        ("0", r"size 0 is not a positive multiple of 2M"),
        ("-1", r"bad size '-1'"),
        ("99999999999999999999G", r"--pmem: 2 device\(s\) need \d+[MGT] of guest physical addresses, but the pmem window .* holds \d+[GMT]$"),
        ("1T", r"--pmem: 2 device\(s\) need \d+[MGT] of guest physical addresses, but the pmem window .* holds \d+[GMT]$"),
    ],
)
def test_pmem_size_range_checked_before_any_file(size, pattern, pmem_file, guest, tmp_path):
    new = tmp_path / "new.img"
    before = _snapshot(pmem_file)
    run = cli("run", "--kernel", guest.vmlinux, "--pmem", f"{pmem_file},size=8M", "--pmem", f"{new},size={size}", workdir=tmp_path)
    assert_user_error(run, pattern)
    assert _snapshot(pmem_file) == before
    assert not new.exists()


def test_pmem_prealloc_with_discard_writes(pmem_file, guest, tmp_path):
    before = _snapshot(pmem_file)
    run = cli("run", "--kernel", guest.vmlinux, "--pmem", f"{pmem_file},discard-writes=on,prealloc=on", workdir=tmp_path)
    assert_user_error(run, r"prealloc=on with discard-writes=on")
    assert _snapshot(pmem_file) == before


def test_a_pmem_id_and_an_object_id_may_not_collide(guest, tmp_path):
    new = tmp_path / "new.img"
    run = cli("run", "--kernel", guest.vmlinux, "--pmem", f"{new},size=2M,id=x", "--object",
              f"memory-backend-file,id=x,mem-path={tmp_path / 'o.img'},share=on,size=2M",
              "--device", "virtio-pmem-pci,memdev=x", workdir=tmp_path)  # fmt: skip
    assert_user_error(run, r"id 'x' names two memory backends")
    assert not new.exists() and not (tmp_path / "o.img").exists()


def test_watchdog_must_be_finite_and_a_kernel_must_be_a_file(guest, tmp_path):
    assert_user_error(cli("run", "--kernel", guest.vmlinux, "--watchdog", "nan", workdir=tmp_path), r"--watchdog must be a positive")
    assert_user_error(cli("run", "--kernel", tmp_path, workdir=tmp_path), r"not a regular file")


def _ram_bytes(trace: str) -> int:
    """Guest RAM from --trace's memory map: the sum of the KVM memory slots named RAM."""
    slots = re.findall(r"^map: (0x[0-9a-f]+) \+(0x[0-9a-f]+) slot \d+ (\S+)", trace, re.MULTILINE)
    return sum(int(size, 16) for _, size, name in slots if "ram" in name.lower())


@pytest.mark.parametrize(("pmem_size", "mem"), [(None, "128M"), ("256M", "128M"), ("4G", "256M"), ("8G", "512M")])
def test_default_mem_fits_the_pmem_given(tmp_path, pmem_size, mem):
    """Without --mem the guest gets 128 MiB, more when the --pmem devices' page structures
    would take over a quarter of it; an explicit --mem is used as given."""
    from support.synthetic_kernels import smoke_pvh_elf

    kernel = tmp_path / "smoke.elf"
    kernel.write_bytes(smoke_pvh_elf(b"hi\n"))
    pmem = ["--pmem", f"{tmp_path / 'p.img'},size={pmem_size}"] if pmem_size else []
    run = cli("run", "--kernel", kernel, "--trace", *pmem, workdir=tmp_path)
    assert run.status == 0, run.describe()
    assert _ram_bytes(run.stderr) == parse_size(mem), run.describe()
    assert "page structures" not in run.stderr, run.describe()  # no memmap warning at the default


def test_explicit_mem_is_used_as_given(tmp_path):
    from support.synthetic_kernels import smoke_pvh_elf

    kernel = tmp_path / "smoke.elf"
    kernel.write_bytes(smoke_pvh_elf(b"hi\n"))
    run = cli("run", "--kernel", kernel, "--trace", "--mem", "96M", workdir=tmp_path)
    assert run.status == 0 and _ram_bytes(run.stderr) == 96 << 20, run.describe()


@pytest.mark.parametrize("value", ["32", "-1", "x", "1.5", "٣"])
def test_hotplug_slots_out_of_range(value, tmp_path):
    run = cli("run", f"--hotplug-slots={value}", workdir=tmp_path)
    assert run.status == 2 and TRACEBACK not in run.stderr, run.describe()
    assert re.search(r"--hotplug-slots: .* is not a number of PCI slots from 0 to 31", run.stderr), run.describe()
