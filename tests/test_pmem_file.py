"""--pmem option parsing and backing files: every error is a one-line UserError that leaves
every file byte-for-byte, size-for-size and mtime-for-mtime untouched."""

from __future__ import annotations

import fcntl
import mmap
import os
import subprocess
from pathlib import Path

import pytest

from minivmm.errors import UserError
from minivmm.pmemfile import PmemSpec, open_all, open_backing, parse_pmem_option

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
