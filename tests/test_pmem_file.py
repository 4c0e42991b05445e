"""--pmem option parsing and backing files: every error is a one-line UserError that leaves
every file byte-for-byte, size-for-size and mtime-for-mtime untouched."""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import subprocess
from pathlib import Path

import pytest

from minivmm.errors import UserError
from minivmm import layout
from minivmm.pmemfile import PmemSpec, check_plan, open_all, open_backing, parse_pmem_option, sparse_warnings

MiB = 1 << 20


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, spec",
    [
        ("disk.img", PmemSpec("disk.img")),
        ("/a/b.img,size=4G", PmemSpec("/a/b.img", size=4 << 30)),
        ("x,id=data0,size=2M", PmemSpec("x", size=2 * MiB, id="data0")),
        ("x,discard-writes=on", PmemSpec("x", discard_writes=True)),
        ("x,discard-writes=off,size=256M,id=a.b-c_d", PmemSpec("x", 256 * MiB, "a.b-c_d", False)),
        ("x,size=2M,prealloc=on", PmemSpec("x", size=2 * MiB, prealloc=True)),
        ("x,prealloc=off", PmemSpec("x")),
    ],
)
def test_parse(text: str, spec: PmemSpec) -> None:
    assert parse_pmem_option(text) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        ",size=2M",
        "x,",
        "x,size",
        "x,size=",
        "x,size=3M",  # not a multiple of 2 MiB
        "x,size=0",
        "x,size=1K",
        "x,size=lots",
        "x,size=-2M",
        "x,size=2M,size=4M",
        "x,colour=blue",
        "x,discard-writes=yes",
        "x,discard-writes",
        "x,id=",
        "x,id=a b",
        "x,id=-lead",
        "x,id=a,id=b",
        "x,size=0",
        "x,size=-1",
        "x,size=-2M",
        "x,prealloc=maybe",
        "x,prealloc=on,discard-writes=on",
    ],
)
def test_parse_errors(text: str) -> None:
    with pytest.raises(UserError) as err:
        parse_pmem_option(text)
    assert "\n" not in str(err.value) and str(err.value)


# ---------------------------------------------------------------- opening: successes


def test_create_sparse(tmp_path: Path) -> None:
    path = tmp_path / "new.img"
    b = open_backing(parse_pmem_option(f"{path},size=64M"))
    try:
        st = path.stat()
        assert b.size == st.st_size == 64 * MiB and b.created and b.id == "pmem0"
        assert st.st_blocks * 512 < MiB  # sparse
        b.mapping[5 * MiB : 5 * MiB + 3] = b"abc"  # MAP_SHARED: reaches the file
        os.fdatasync(b.fd)
        with open(path, "rb") as f:
            f.seek(5 * MiB)
            assert f.read(3) == b"abc"
    finally:
        b.close()


def test_existing_without_size(tmp_path: Path) -> None:
    path = tmp_path / "old.img"
    path.write_bytes(b"\x5a" * (4 * MiB))
    b = open_backing(PmemSpec(str(path), id="x"))
    try:
        assert b.size == 4 * MiB and not b.created and b.id == "x" and b.mapping[:2] == b"\x5a\x5a"
    finally:
        b.close()


def test_existing_extended_sparsely(tmp_path: Path) -> None:
    path = tmp_path / "old.img"
    path.write_bytes(b"\x11" * (2 * MiB))
    b = open_backing(PmemSpec(str(path), size=8 * MiB))
    try:
        assert path.stat().st_size == 8 * MiB
        assert path.read_bytes()[: 2 * MiB] == b"\x11" * (2 * MiB)
    finally:
        b.close()


def test_exact_size_untouched(tmp_path: Path) -> None:
    path = tmp_path / "old.img"
    path.write_bytes(b"\x22" * (2 * MiB))
    before = snapshot(path)
    open_backing(PmemSpec(str(path), size=2 * MiB)).close()
    assert snapshot(path) == before


def test_open_all_default_ids_avoid_given_ones(tmp_path: Path) -> None:
    specs = [PmemSpec(str(tmp_path / f"{i}.img"), size=2 * MiB, id="pmem0" if i == 1 else None) for i in range(3)]
    bs = open_all(specs)
    try:
        assert [b.id for b in bs] == ["pmem1", "pmem0", "pmem2"]
    finally:
        for b in bs:
            b.close()


def test_discard_writes_maps_private(tmp_path: Path) -> None:
    path = tmp_path / "base.img"
    path.write_bytes(b"\x33" * (2 * MiB))
    before = snapshot(path)
    b = open_backing(PmemSpec(str(path), discard_writes=True))
    try:
        assert fcntl.fcntl(b.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        b.mapping[:4] = b"XXXX"
        b.mapping.flush()  # msync of a private mapping writes nothing back
        assert b.mapping[:4] == b"XXXX"
        assert snapshot(path) == before  # not even while it is mapped
    finally:
        b.close()
    assert snapshot(path) == before


def test_two_discard_opens_share_a_file(tmp_path: Path) -> None:
    """Two discard-writes opens of one base image (two VMs) are both admitted (shared lock) and
    both read the file; a write through one reaches neither the other nor the file. While
    they are open a read/write open is refused; once both are closed it is admitted."""
    path = tmp_path / "base.img"
    path.write_bytes(b"\x44" * MiB + b"\x55" * MiB)
    before = snapshot(path)
    a = open_backing(PmemSpec(str(path), discard_writes=True))
    try:
        b = open_backing(PmemSpec(str(path), discard_writes=True))  # another VM, same base image
        try:
            for m in (a, b):
                assert m.discard_writes and fcntl.fcntl(m.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
                assert m.mapping[:2] == b"\x44\x44" and m.mapping[MiB : MiB + 2] == b"\x55\x55"
            a.mapping[:4] = b"AAAA"
            b.mapping[MiB : MiB + 4] = b"BBBB"
            a.mapping.flush()
            b.mapping.flush()
            assert a.mapping[:4] == b"AAAA" and a.mapping[MiB : MiB + 4] == b"\x55" * 4
            assert b.mapping[:4] == b"\x44" * 4 and b.mapping[MiB : MiB + 4] == b"BBBB"
            assert snapshot(path) == before
            assert "in use" in expect_user_error([path], lambda: open_backing(PmemSpec(str(path))))
        finally:
            b.close()
    finally:
        a.close()
    assert snapshot(path) == before
    open_backing(PmemSpec(str(path))).close()  # the shared locks went with the closes


def test_discard_open_refused_while_a_writer_holds_the_file(tmp_path: Path) -> None:
    path = tmp_path / "base.img"
    path.write_bytes(bytes(2 * MiB))
    writer = open_backing(PmemSpec(str(path)))
    try:
        assert "in use" in expect_user_error([path], lambda: open_backing(PmemSpec(str(path), discard_writes=True)))
    finally:
        writer.close()


# ---------------------------------------------------------------- opening: errors leave files untouched


def snapshot(path: Path) -> tuple[bytes, int, int] | None:
    if not path.exists() and not path.is_symlink():
        return None
    st = path.stat()
    return (path.read_bytes() if path.is_file() else b"", st.st_size, st.st_mtime_ns)


def write_old(path: Path, size: int) -> None:
    path.write_bytes(os.urandom(4096) * (size // 4096) + os.urandom(size % 4096))
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))  # a distinctive mtime


def expect_user_error(paths: list[Path], fn) -> str:
    before = {p: snapshot(p) for p in paths}
    listing = sorted(os.listdir(paths[0].parent))
    with pytest.raises(UserError) as err:
        fn()
    msg = str(err.value)
    assert msg and "\n" not in msg
    for p in paths:
        assert snapshot(p) == before[p], f"{p} changed"
    assert sorted(os.listdir(paths[0].parent)) == listing  # nothing created or left behind
    return msg


def test_missing_without_size(tmp_path: Path) -> None:
    p = tmp_path / "none.img"
    assert "size" in expect_user_error([p], lambda: open_backing(PmemSpec(str(p))))


def test_missing_with_discard_writes(tmp_path: Path) -> None:
    p = tmp_path / "none.img"
    expect_user_error([p], lambda: open_backing(PmemSpec(str(p), size=2 * MiB, discard_writes=True)))


def test_missing_directory(tmp_path: Path) -> None:
    p = tmp_path / "nodir" / "x.img"
    expect_user_error([tmp_path / "nodir"], lambda: open_backing(PmemSpec(str(p), size=2 * MiB)))
    assert not (tmp_path / "nodir").exists()


def test_longer_than_size_never_shrunk(tmp_path: Path) -> None:
    p = tmp_path / "big.img"
    write_old(p, 4 * MiB)
    assert "shrink" in expect_user_error([p], lambda: open_backing(PmemSpec(str(p), size=2 * MiB)))


@pytest.mark.parametrize("length", [0, 4096, 3 * MiB, 2 * MiB + 1])
def test_existing_length_not_2m_multiple(tmp_path: Path, length: int) -> None:
    p = tmp_path / "odd.img"
    write_old(p, length)
    expect_user_error([p], lambda: open_backing(PmemSpec(str(p))))


def test_shorter_with_discard_writes_not_extended(tmp_path: Path) -> None:
    p = tmp_path / "short.img"
    write_old(p, 2 * MiB)
    expect_user_error([p], lambda: open_backing(PmemSpec(str(p), size=4 * MiB, discard_writes=True)))


def test_spec_size_not_2m_multiple(tmp_path: Path) -> None:
    p = tmp_path / "short.img"
    write_old(p, 2 * MiB)
    expect_user_error([p], lambda: open_backing(PmemSpec(str(p), size=3 * MiB)))


def test_directory(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    assert "directory" in expect_user_error([d], lambda: open_backing(PmemSpec(str(d), size=2 * MiB)))


def test_fifo(tmp_path: Path) -> None:
    f = tmp_path / "fifo"
    os.mkfifo(f)
    expect_user_error([f], lambda: open_backing(PmemSpec(str(f), size=2 * MiB)))


def test_not_writable(tmp_path: Path) -> None:
    p = tmp_path / "ro.img"
    write_old(p, 2 * MiB)
    if os.geteuid() != 0:
        p.chmod(0o444)
        expect_user_error([p], lambda: open_backing(PmemSpec(str(p), size=4 * MiB)))
        return
    # root ignores modes: a running executable cannot be opened for writing (ETXTBSY)
    exe = tmp_path / "sleeper"
    exe.write_bytes(Path("/bin/sleep").read_bytes())
    exe.chmod(0o755)
    proc = subprocess.Popen([str(exe), "30"])
    try:
        os.utime(exe, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
        msg = expect_user_error([exe], lambda: open_backing(PmemSpec(str(exe), size=4 * MiB)))
        assert "read/write" in msg
    finally:
        proc.kill()
        proc.wait()


def test_same_file_twice(tmp_path: Path) -> None:
    p = tmp_path / "a.img"
    write_old(p, 2 * MiB)
    link = tmp_path / "hard.img"
    os.link(p, link)
    sym = tmp_path / "sym.img"
    sym.symlink_to(p)
    for other in (p, link, sym, tmp_path / "." / "a.img"):
        msg = expect_user_error([p, link], lambda other=other: open_all([PmemSpec(str(p)), PmemSpec(str(other), size=4 * MiB)]))
        assert "same file" in msg


def test_same_missing_file_twice(tmp_path: Path) -> None:
    p = tmp_path / "new.img"
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path)
    for other in (tmp_path / "sub" / ".." / "new.img", tmp_path / "link" / "new.img"):
        msg = expect_user_error([p], lambda other=other: open_all([PmemSpec(str(p), size=2 * MiB), PmemSpec(str(other), size=2 * MiB)]))
        assert "same file" in msg


def test_duplicate_ids(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    write_old(b, 2 * MiB)
    expect_user_error([a, b], lambda: open_all([PmemSpec(str(a), size=2 * MiB, id="d"), PmemSpec(str(b), size=4 * MiB, id="d")]))


def test_in_use_by_another_process(tmp_path: Path) -> None:
    p = tmp_path / "busy.img"
    write_old(p, 2 * MiB)
    fd = os.open(p, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert "in use" in expect_user_error([p], lambda: open_backing(PmemSpec(str(p), size=4 * MiB)))
        assert "in use" in expect_user_error([p], lambda: open_backing(PmemSpec(str(p), discard_writes=True)))
    finally:
        os.close(fd)


def test_later_error_creates_and_extends_nothing(tmp_path: Path) -> None:
    """Validation of every spec happens before any file is created or extended."""
    new, short, bad = tmp_path / "new.img", tmp_path / "short.img", tmp_path / "bad.img"
    write_old(short, 2 * MiB)
    write_old(bad, 8 * MiB)
    specs = [PmemSpec(str(new), size=2 * MiB), PmemSpec(str(short), size=4 * MiB), PmemSpec(str(bad), size=2 * MiB)]
    expect_user_error([new, short, bad], lambda: open_all(specs))


def test_failure_after_creation_is_rolled_back(tmp_path: Path, monkeypatch) -> None:
    """If mapping fails after files were created/extended, they are removed/restored."""
    new, short, exact = tmp_path / "new.img", tmp_path / "short.img", tmp_path / "exact.img"
    write_old(short, 2 * MiB)
    write_old(exact, 2 * MiB)
    real = mmap.mmap
    calls = []

    def flaky(fd, length, *args, **kw):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(12, "Cannot allocate memory")
        return real(fd, length, *args, **kw)

    monkeypatch.setattr(mmap, "mmap", flaky)
    specs = [PmemSpec(str(new), size=2 * MiB), PmemSpec(str(short), size=4 * MiB), PmemSpec(str(exact))]
    expect_user_error([new, short, exact], lambda: open_all(specs))
    assert len(calls) == 3


def test_no_fd_leak_on_errors(tmp_path: Path) -> None:
    p = tmp_path / "a.img"
    write_old(p, 4 * MiB)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(UserError):
            open_all([PmemSpec(str(p)), PmemSpec(str(p))])
        with pytest.raises(UserError):
            open_backing(PmemSpec(str(p), size=2 * MiB))
    assert len(os.listdir("/proc/self/fd")) == before


# ---------------------------------------------------------------- the whole plan, before any file


GiB = 1 << 30
MEM_256M = 256 * MiB


def expect_plan_refused(tmp_path: Path, specs: list[PmemSpec], mem: int, pattern: str) -> None:
    """check_plan refuses (one line matching `pattern`) and the machine's order — plan first,
    files after — leaves the directory as it was."""
    paths = [Path(s.path) for s in specs] or [tmp_path / "none"]
    msg = expect_user_error(paths, lambda: check_plan(specs, mem))
    assert re.search(pattern, msg), msg


@pytest.mark.parametrize(
    "mem, pattern",
    [
        (0, r"memory size 0 MiB is too small"),
        (1 * MiB, r"too small"),
        (16 * MiB + 1, r"not a multiple of 4 KiB"),
        (99999999999999999999 * GiB, r"does not fit below the 39-bit"),
    ],
)
def test_plan_checks_mem_first(tmp_path: Path, mem: int, pattern: str) -> None:
    new = tmp_path / "new.img"
    expect_plan_refused(tmp_path, [PmemSpec(str(new), size=2 * MiB)], mem, pattern)


@pytest.mark.parametrize("size", [99999999999999999999 * GiB, 1 << 40, 512 * GiB])
def test_plan_checks_the_pmem_window(tmp_path: Path, size: int) -> None:
    """Sizes however large: the guest-physical map is checked before the file is created."""
    new = tmp_path / "new.img"
    expect_plan_refused(tmp_path, [PmemSpec(str(new), size=size)], MEM_256M, r"--pmem: 1 device\(s\) need \d+[MGT] of guest physical addresses, but the pmem window below the 39-bit limit holds 492G$")


def test_plan_checks_the_window_for_the_sum_of_regions(tmp_path: Path) -> None:
    """Each region fits alone; together (128 MiB aligned each) they do not."""
    window = layout.pmem_window(MEM_256M)
    half = layout.align_down(window.size // 2, layout.PMEM_ALIGN)
    specs = [PmemSpec(str(tmp_path / f"{i}.img"), size=half + 2 * MiB) for i in range(2)]
    assert check_plan(specs[:1], 64 * GiB) == []  # alone: fits, no warning
    expect_plan_refused(tmp_path, specs, 64 * GiB, r"2 device\(s\) need")


def test_plan_checks_pci_slots(tmp_path: Path) -> None:
    specs = [PmemSpec(str(tmp_path / f"{i}.img"), size=2 * MiB) for i in range(32)]
    assert check_plan(specs[:31], MEM_256M) == []
    expect_plan_refused(tmp_path, specs, MEM_256M, r"^pmem31: PCI bus 0 is full \(at most 31 devices\)$")


def test_plan_checks_ids(tmp_path: Path) -> None:
    specs = [PmemSpec(str(tmp_path / "a.img"), size=2 * MiB, id="d"), PmemSpec(str(tmp_path / "b.img"), size=2 * MiB, id="d")]
    expect_plan_refused(tmp_path, specs, MEM_256M, r"id 'd' given to more than one device")


def test_plan_refuses_page_structures_beyond_half_of_ram(tmp_path: Path) -> None:
    """16 GiB of pmem needs 256 MiB of struct page (64 bytes per 4 KiB page): all of a 256 MiB
    guest. The message says how much RAM the layout needs."""
    new = tmp_path / "big.img"
    expect_plan_refused(
        tmp_path, [PmemSpec(str(new), size=16 * GiB)], MEM_256M,
        r"^--pmem: the guest needs 256 MiB of RAM for the page structures of 16G of pmem .*more than half of --mem 256 MiB; give --mem 512 MiB or more$",
    )  # fmt: skip
    assert check_plan([PmemSpec(str(new), size=16 * GiB)], 512 * MiB) != []  # exactly half: allowed, with a warning


def test_plan_counts_an_existing_file_without_size(tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(16 * GiB)  # sparse (too large for expect_user_error's byte snapshot)
    before = os.stat(big)
    with pytest.raises(UserError, match=r"needs 256 MiB of RAM"):
        check_plan([PmemSpec(str(big))], MEM_256M)
    after = os.stat(big)
    assert (after.st_size, after.st_mtime_ns, after.st_blocks) == (before.st_size, before.st_mtime_ns, before.st_blocks)


def test_plan_warns_above_a_quarter_of_ram(tmp_path: Path) -> None:
    spec = PmemSpec(str(tmp_path / "a.img"), size=6 * GiB)  # 96 MiB of struct page
    assert check_plan([spec], MEM_256M) == [
        "--pmem: the guest needs 96 MiB of RAM for the page structures of 6G of pmem (64 bytes per 4 KiB page), 38% of --mem 256 MiB"
    ]
    assert check_plan([PmemSpec(spec.path, size=4 * GiB)], MEM_256M) == []  # 25%: quiet
    assert not Path(spec.path).exists()


# ---------------------------------------------------------------- prealloc and free space


def test_prealloc_allocates_every_block(tmp_path: Path) -> None:
    p = tmp_path / "pre.img"
    b = open_backing(PmemSpec(str(p), size=8 * MiB, prealloc=True))
    try:
        st = os.stat(p)
        assert st.st_size == 8 * MiB and st.st_blocks * 512 >= 8 * MiB
        assert sparse_warnings([b]) == []
    finally:
        b.close()


IN_SMALL_TMPFS = """
import json, os, sys
from minivmm.errors import UserError
from minivmm.pmemfile import open_all, parse_pmem_option, sparse_warnings
d = sys.argv[1]
old = os.path.join(d, "old.img")
with open(old, "wb") as f:
    f.write(b"Z" * (2 << 20))
os.utime(old, ns=(10**18, 10**18))
error, warnings = None, []
try:
    backings = open_all([parse_pmem_option(arg.format(d=d)) for arg in sys.argv[2:]])
    warnings = sparse_warnings(backings)
except UserError as exc:
    error = str(exc)
st = os.stat(old)
print(json.dumps({"error": error, "warnings": warnings, "sizes": {n: os.stat(os.path.join(d, n)).st_size for n in sorted(os.listdir(d))},
                  "old_intact": open(old, "rb").read() == b"Z" * (2 << 20) and st.st_mtime_ns == 10**18}))
"""


def in_small_tmpfs(tmp_path: Path, *pmem: str) -> dict:
    """Open `pmem` options ({d} is the directory) on an 8 MiB tmpfs of a private mount namespace."""
    import json
    import shutil
    import sys

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare(1) and root for a private tmpfs")
    root = Path(__file__).resolve().parents[1]
    script = f'mount -t tmpfs -o size=8m tmpfs "$1" && exec "{sys.executable}" -c "$0" "$@"'
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, IN_SMALL_TMPFS, str(tmp_path), *pmem],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(root)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_prealloc_on_a_full_disk_is_refused_and_removes_the_new_file(tmp_path: Path) -> None:
    r = in_small_tmpfs(tmp_path, "{d}/new.img,size=16M,prealloc=on")
    assert r["error"] is not None and "\n" not in r["error"]
    assert r["error"].endswith("new.img: prealloc=on cannot allocate 16M (6M free on its filesystem): No space left on device"), r
    assert r["sizes"] == {"old.img": 2 * MiB} and r["old_intact"], r


def test_prealloc_on_a_full_disk_leaves_an_existing_file_as_it_was(tmp_path: Path) -> None:
    r = in_small_tmpfs(tmp_path, "{d}/old.img,size=16M,prealloc=on")
    assert r["error"] is not None and "old.img: prealloc=on cannot allocate 16M" in r["error"], r
    assert r["sizes"] == {"old.img": 2 * MiB} and r["old_intact"], r


def test_sparse_file_larger_than_the_free_space_warns(tmp_path: Path) -> None:
    r = in_small_tmpfs(tmp_path, "{d}/new.img,size=64M", "{d}/old.img")
    assert r["error"] is None, r
    assert len(r["warnings"]) == 1, r  # old.img is fully allocated: no warning for it
    assert r["warnings"][0].endswith(
        "new.img: 64M of the file is not allocated but its filesystem has only 6M free; guest writes may fail (prealloc=on allocates it up front)"
    ), r
