"""Power-failure simulation with the real default guest (README "Power-failure simulation").

Two pmem devices, each an ext4 image holding /powerfail (two pages of '.', written by the
host): pmem0 with ``lose-unflushed=on`` (and a flush log), pmem1 without. The guest
(guest/scripts/powerfail.sh) stores "A-..." into page 0 through a DAX mapping from user mode
and msyncs it (a virtio-pmem FLUSH), then stores "B-..." into page 1 and never flushes.

* power cut (SIGKILL, Ctrl-A p on the console's pty, QMP x-power-cut) or an ordinary end
  without a guest flush (SIGTERM, Ctrl-A x): pmem0 holds A, not B; pmem1 holds both (its
  writes reach the host page cache at once);
* clean guest poweroff: both hold A and B (the guest flushes on its way down);
* the flush log replays onto a copy of the starting image to exactly the final image.

That pmem0 holds A proves KVM's dirty log caught user-mode stores through a DAX mapping on
this host: nothing but the log's pages ever reaches the file. Boots the real guest (minutes
each on a software-KVM host).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pmembootutil import BOOT_TIMEOUT, debugfs, make_ext4, sha256
from support.runner import RunResult, start_minivmm
from test_shell_boot import Pty

from minivmm import guestimage
from minivmm.flushlog import apply_record, read_log

MiB = 1 << 20
PAGE = 4096
IMAGE_SIZE = 32 * MiB
FILE_IN_FS = "/powerfail"
CMDLINE = "console=ttyS0 quiet panic=-1 reboot=k minivmm.script=powerfail minivmm.pmemdevs=2"
HOLDING = b"minivmm-test: dax-store holding"
REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.boot


@dataclass
class Setup:
    images: list[Path]  # pmem0 (lose-unflushed), pmem1 (normal)
    start: Path  # a copy of pmem0 before the boot
    log: Path  # pmem0's flush log
    args: list[str]


def prepare(tmp_path: Path, guest, mode: str, extra: tuple[str, ...] = ()) -> Setup:
    """The two images with /powerfail, and the `minivmm run` arguments."""
    initrd = guestimage.initramfs_path()
    if not initrd.is_file():
        pytest.fail(f"{initrd} not built (it holds guest/scripts/powerfail.sh): run `minivmm guest build`")
    filler = tmp_path / "filler"
    filler.write_bytes(b"." * 2 * PAGE)
    images = []
    for n in range(2):
        image = make_ext4(tmp_path / f"pmem{n}.img", IMAGE_SIZE)
        debugfs(image, f"write {filler} {FILE_IN_FS.lstrip('/')}", write=True)
        images.append(image)
    start = tmp_path / "pmem0.start"
    shutil.copyfile(images[0], start)
    log = tmp_path / "pmem0.flushlog"
    args = ["--kernel", str(guest.vmlinux), "--initrd", str(initrd), "--cmdline", f"{CMDLINE} minivmm.powerfail={mode}",
            "--pmem", f"{images[0]},lose-unflushed=on,flush-log={log}", "--pmem", str(images[1]), *extra]  # fmt: skip
    return Setup(images, start, log, args)


def pages(image: Path) -> tuple[bytes, bytes]:
    """The two pages of /powerfail as the (unmounted) image holds them."""
    data = debugfs(image, f"cat {FILE_IN_FS}").encode()
    assert len(data) == 2 * PAGE, f"{image}: {FILE_IN_FS} has {len(data)} bytes"
    return data[:PAGE], data[PAGE:]


def assert_holds(image: Path, tag: str, a: bool, b: bool) -> None:
    page0, page1 = pages(image)
    want_a = f"A-{tag}-flushed".encode()
    want_b = f"B-{tag}-unflushed".encode()
    assert page0 == (want_a + b"." * (PAGE - len(want_a)) if a else b"." * PAGE), (image, page0[:32])
    assert page1 == (want_b + b"." * (PAGE - len(want_b)) if b else b"." * PAGE), (image, page1[:32])


def file_block(image: Path, index: int) -> int:
    """The image byte offset of /powerfail's block `index` (debugfs bmap)."""
    return int(debugfs(image, f"bmap {FILE_IN_FS} {index}").strip()) * PAGE


def check_guest(out: str) -> None:
    """The guest mounted both devices with DAX and stored everything it should have."""
    assert "FAILED" not in out, out[-3000:]
    for tag in ("mnt", "mnt1"):
        assert f"minivmm: powerfail /{tag} dax=1" in out, out[-3000:]
        assert f"dax-store file=/{tag}/powerfail page=0 bytes={len(f'A-{tag}-flushed')} flag=msync" in out, out[-3000:]
    assert "minivmm: powerfail A flushed" in out


def run_until_holding(setup: Setup, tmp_path: Path, name: str, cut) -> tuple[RunResult, str]:
    """Boot on a pty, wait for the guest to hold after B, `cut(vmm, pty)`, collect the run."""
    pty = Pty()
    vmm = pty.vmm = start_minivmm(setup.args, tmp_path, name=name, stdin=pty.slave, stdout=pty.slave)
    run = None
    try:
        pty.expect(HOLDING, BOOT_TIMEOUT)
        cut(vmm, pty)
        run = vmm.wait(timeout=120)
    finally:
        if run is None:
            vmm.kill()
        try:
            out = pty.drain().decode(errors="replace")
        finally:
            pty.close()
    return run, out


def assert_power_cut(setup: Setup) -> None:
    assert_holds(setup.images[0], "mnt", a=True, b=False)  # lose-unflushed: only the flushed A
    assert_holds(setup.images[1], "mnt1", a=True, b=True)  # normal: B is in the host page cache


def dropped_line(run: RunResult) -> int:
    m = re.search(r"^minivmm: power cut: (\d+) dirty pmem page\(s\) dropped$", run.stderr, re.M)
    assert m, run.describe()
    return int(m.group(1))


def test_sigkill_leaves_the_last_flush_and_the_flush_log_replays_to_it(guest, tmp_path: Path) -> None:
    setup = prepare(tmp_path, guest, "wait")
    run, out = run_until_holding(setup, tmp_path, "sigkill", lambda vmm, pty: vmm.signal(signal.SIGKILL))
    assert run.status in (None, -signal.SIGKILL), run.describe()
    check_guest(out)
    assert_power_cut(setup)
    # The flush log: whole, at least A's flush, A's page in it, B's never; replayed onto the
    # starting image it gives exactly the final image, and every earlier epoch replays too.
    log = read_log(str(setup.log))
    assert log.warning is None and log.records and log.image_size == IMAGE_SIZE
    assert [r.epoch for r in log.records] == list(range(1, len(log.records) + 1))
    a_off, b_off = file_block(setup.start, 0), file_block(setup.start, 1)
    a_pages = [p for r in log.records for off, p in zip(r.offsets, r.pages) if off == a_off]
    assert a_pages and a_pages[-1].startswith(b"A-mnt-flushed."), [p[:16] for p in a_pages]
    assert all(b_off not in r.offsets for r in log.records)
    replayed = tmp_path / "replayed.img"
    for upto in (0, len(log.records)):
        shutil.copyfile(setup.start, replayed)
        cli = subprocess.run([sys.executable, "-m", "minivmm", "pmem", "replay", str(setup.log), str(replayed), "--upto", str(upto)],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)  # fmt: skip
        assert cli.returncode == 0 and cli.stderr == "", cli.stderr
        assert (sha256(replayed) == sha256(setup.images[0])) == (upto == len(log.records))
    assert sha256(setup.start) != sha256(setup.images[0])


def test_ctrl_a_p_cuts_the_power(guest, tmp_path: Path) -> None:
    setup = prepare(tmp_path, guest, "wait")
    run, out = run_until_holding(setup, tmp_path, "ctrl-a-p", lambda vmm, pty: pty.type(b"\x01p"))
    assert run.status == 0 and run.stop_reason == "power cut", run.describe()
    assert dropped_line(run) >= 1  # B's page at least
    check_guest(out)
    assert_power_cut(setup)


@pytest.mark.parametrize(
    ("how", "reason"),
    [("SIGTERM", "stopped by SIGTERM"), ("Ctrl-A x", "quit from the console (Ctrl-A x)")],
)
def test_an_ordinary_end_flushes_nothing(guest, tmp_path: Path, how: str, reason: str) -> None:
    """Ending the run the ordinary way (a signal, the console's quit) is a power cut too: the
    host never flushes on the guest's behalf."""
    setup = prepare(tmp_path, guest, "wait")
    cut = (lambda vmm, pty: vmm.signal(signal.SIGTERM)) if how == "SIGTERM" else (lambda vmm, pty: pty.type(b"\x01x"))
    run, out = run_until_holding(setup, tmp_path, how.replace(" ", "-"), cut)
    assert run.status == 0 and run.stop_reason == reason, run.describe()
    assert "power cut" not in run.stderr
    check_guest(out)
    assert_power_cut(setup)


def qmp_power_cut(path: Path) -> dict:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(str(path))
        stream = sock.makefile("rwb")
        assert "QMP" in json.loads(stream.readline())
        for command in ("qmp_capabilities", "x-power-cut"):
            stream.write(json.dumps({"execute": command}).encode() + b"\n")
            stream.flush()
            while "event" in (reply := json.loads(stream.readline())):
                pass
        return reply


def test_qmp_x_power_cut(guest, tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    setup = prepare(tmp_path, guest, "wait", ("--qmp", str(sock)))
    replies: list[dict] = []
    run, out = run_until_holding(setup, tmp_path, "qmp", lambda vmm, pty: replies.append(qmp_power_cut(sock)))
    assert run.status == 0 and run.stop_reason == "power cut", run.describe()
    (reply,) = replies
    assert reply["return"]["dropped-pages"] == dropped_line(run) >= 1, reply
    check_guest(out)
    assert_power_cut(setup)


def test_clean_poweroff_keeps_everything(guest, tmp_path: Path) -> None:
    setup = prepare(tmp_path, guest, "poweroff")
    vmm = start_minivmm(setup.args, tmp_path, name="poweroff")
    started = time.monotonic()
    run = vmm.wait(timeout=BOOT_TIMEOUT)
    assert run.status == 0 and run.stop_reason == "guest powered off (ACPI S5)", run.describe()
    print(f"poweroff boot took {time.monotonic() - started:.0f} s")
    check_guest(run.stdout)
    assert "minivmm: powerfail B written" in run.stdout
    assert_holds(setup.images[0], "mnt", a=True, b=True)  # the shutdown's flush is honoured
    assert_holds(setup.images[1], "mnt1", a=True, b=True)
    log = read_log(str(setup.log))
    b_off = file_block(setup.start, 1)
    assert any(b_off in r.offsets for r in log.records)  # B reached the file by a flush


# -- an ext4 workload: every flush point is a file system e2fsck accepts ----------------------
EXT4_FILES = 24


def fs_files(image: Path) -> dict[str, str]:
    """/work's regular files -> contents, after the image's journal is recovered."""
    listing = debugfs(image, "ls -p /work")
    names = [f.split("/")[5] for f in listing.split("\n") if f.count("/") >= 6 and f.split("/")[2].startswith("100")]
    return {name: debugfs(image, f"cat /work/{name}") for name in names}


def recover_and_check(image: Path) -> subprocess.CompletedProcess:
    """Replay the ext4 journal as a mount would (e2fsck -E journal_only), then `e2fsck -fn`."""
    subprocess.run(["e2fsck", "-E", "journal_only", "-p", str(image)], capture_output=True, check=False)
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, check=False)


def test_ext4_every_flush_point_is_consistent_and_holds_what_was_fsynced(guest, tmp_path: Path) -> None:
    initrd = guestimage.initramfs_path()
    if not initrd.is_file():
        pytest.fail(f"{initrd} not built (it holds guest/scripts/powerfail-ext4.sh): run `minivmm guest build`")
    image = make_ext4(tmp_path / "pmem0.img", IMAGE_SIZE)
    start = tmp_path / "pmem0.start"
    shutil.copyfile(image, start)
    log_path = tmp_path / "pmem0.flushlog"
    args = ["--kernel", str(guest.vmlinux), "--initrd", str(initrd),
            "--cmdline", "console=ttyS0 quiet panic=-1 reboot=k minivmm.script=powerfail-ext4",
            "--pmem", f"{image},lose-unflushed=on,flush-log={log_path}"]  # fmt: skip
    run = start_minivmm(args, tmp_path, name="ext4").wait(timeout=BOOT_TIMEOUT)
    assert run.status == 0 and run.stop_reason == "guest powered off (ACPI S5)", run.describe()
    assert f"minivmm: ext4 workload done files={EXT4_FILES}" in run.stdout and "FAILED" not in run.stdout, run.describe()
    log = read_log(str(log_path))
    assert log.warning is None and len(log.records) >= EXT4_FILES  # at least one flush per fsync
    raw, check = tmp_path / "point.img", tmp_path / "check.img"
    shutil.copyfile(start, raw)
    held = 0
    with open(raw, "r+b") as f:
        for record in log.records:  # flush point after flush point
            apply_record(f.fileno(), record)
            f.flush()
            shutil.copyfile(raw, check)  # recovery changes the copy, not the flush point
            fsck = recover_and_check(check)
            assert fsck.returncode == 0, f"epoch {record.epoch}: e2fsck -fn exited {fsck.returncode}:\n{fsck.stdout}"
            files = fs_files(check) if re.search(r"/work/", debugfs(check, "ls -p /")) else {}
            names = {n for n in files if not n.endswith(".tmp")}
            k = len(names)
            assert names == {f"f{i}" for i in range(1, k + 1)}, f"epoch {record.epoch}: {sorted(names)}"
            for i in range(1, k + 1):
                assert files[f"f{i}"] == f"minivmm powerfail-ext4 file {i}\n", (record.epoch, i, files[f"f{i}"])
            assert k >= held, f"epoch {record.epoch}: {k} files, an earlier flush point had {held}"
            held = k
    assert held == EXT4_FILES
    assert sha256(raw) == sha256(image)  # the last flush point is the final image
