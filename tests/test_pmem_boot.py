"""virtio-pmem end to end: the real default guest kernel on real KVM, booted by
``python -m minivmm run`` with ``--pmem`` backing files in tmp_path.

Four boots, each checking several things:

* kernel-level flush, through PVH (vmlinux) and through the bzImage protocol: the kernel
  itself mounts an ext4 root from /dev/pmem0 (no initrd) and runs /sbin/init from it (the
  static test init, put into the image with debugfs, never mounting it on the host); the
  superblock's mount count and last mount time change in the host file, and the kernel's
  own superblock/journal writes reach the device as flush requests that become host fsyncs;
* user space with two devices, then a second boot on the same image with
  ``discard-writes=on``: sizes, a DAX mount, a token written, fsynced, read back in the guest
  and found in the backing file by the host, a 32 MiB DAX mapping first touched with 2 MiB
  (PMD) faults; then read back again on the next boot, while
  a new guest write is visible to the guest but never reaches the file.

Each boot takes about a minute to a few minutes on the software KVM (kvm_pvm) host.
"""

from __future__ import annotations

import re
import secrets
import xml.etree.ElementTree as ET

import pytest
from pmembootutil import (
    TOKEN_PATH_IN_FS,
    MiB,
    cat_file,
    check,
    default_guest,
    extract_test_init,
    init_line,
    init_lines,
    init_lines_with,
    install_init,
    make_ext4,
    pmem_stats,
    run_minivmm,
    sha256,
    superblock,
)

pytestmark = pytest.mark.boot

BASE_CMDLINE = "console=ttyS0 panic=-1 reboot=k"


@pytest.mark.parametrize("kernel_kind", ["vmlinux", "bzImage"], ids=["vmlinux", "bzimage"])
def test_kernel_mounts_pmem_root_and_flushes(tmp_path, kernel_kind):
    """No initrd: root=/dev/pmem0 is mounted by the kernel and its init comes from the image."""
    guest = default_guest()
    init = extract_test_init(guest["initrd"], tmp_path / "initrd")
    image = make_ext4(tmp_path / "root.ext4", 96 * MiB)
    install_init(image, init)
    before = superblock(image)
    assert before["Mount count"] == "0" and before["Last mount time"] == "n/a", before

    run = run_minivmm(
        tmp_path,
        f"root-{kernel_kind}",
        [
            "--kernel", str(guest[kernel_kind]),
            "--pmem", str(image),
            "--cmdline",
            f"{BASE_CMDLINE} root=/dev/pmem0 rootfstype=ext4 rw minivmm.steps=hello minivmm.end=poweroff",
            "--timeline", str(tmp_path / "timeline.svg"),
        ],
    )  # fmt: skip

    # The kernel found the device, mounted the root from it, and ran the image's init.
    check(
        run,
        re.search(r"^EXT4-fs \(pmem0\): mounted filesystem", run.stdout, re.MULTILINE),
        "the kernel did not mount ext4 from pmem0",
    )
    check(
        run,
        re.search(r"^VFS: Mounted root \(ext4 filesystem\) on device 259:0\.", run.stdout, re.MULTILINE),
        "no 'VFS: Mounted root (ext4 filesystem)' line for /dev/pmem0 (block major 259)",
    )
    check(run, re.search(r"^Run /sbin/init as init process", run.stdout, re.MULTILINE), "the kernel did not run /sbin/init")
    check(run, "hello pid=1" in init_lines(run), "the init from the pmem root did not say hello as pid 1")
    check(run, "done ok=1 failed=0" in init_lines(run), "the init's steps did not all pass")
    _check_poweroff(run)

    # The kernel's superblock update landed in the host file (read without mounting).
    after = superblock(image)
    check(
        run,
        int(after["Mount count"]) > int(before["Mount count"]),
        f"Mount count {before['Mount count']} -> {after['Mount count']}: the mount did not reach the file",
    )
    check(
        run,
        after["Last mount time"] != before["Last mount time"],
        f"Last mount time unchanged ({after['Last mount time']})",
    )

    # The kernel's flushes (journal commits, FUA superblock writes, sync() at the end) were
    # served as virtio-pmem flush requests, each batch covered by a host fdatasync.
    st = pmem_stats(run, "pmem0")
    check(run, st.path == str(image), f"pmem0 is backed by {st.path}, not {image}")
    check(run, st.counters.flush_requests >= 1, f"no flush requests for pmem0 ({st})")
    check(run, st.counters.host_fsyncs >= 1, f"no host fsyncs for pmem0 ({st})")
    check(run, st.counters.host_fsyncs <= st.counters.flush_requests, f"more host fsyncs than flush requests ({st})")
    _check_timeline(run, tmp_path / "timeline.svg", st)


def _check_timeline(run, path, st) -> None:
    """--timeline drew the boot: exits, the console milestones in order, and every flush batch."""
    svg = "{http://www.w3.org/2000/svg}"
    root = ET.parse(path).getroot()
    lines = {el.get("class"): [] for el in root.iter(f"{svg}line")}
    for el in root.iter(f"{svg}line"):
        lines[el.get("class")].append(el)
    labels = [el.get("data-label") for el in lines.get("milestone", [])]
    # in time order: the root file system on pmem0 is mounted before its init runs
    check(run, labels[:1] == ["first console line"] and "pmem0 probed" in labels and "init started" in labels
          and labels.index("pmem0 probed") < labels.index("init started"), f"timeline milestones {labels}")
    flushes = lines.get("flush", [])
    check(run, 1 <= len(flushes) <= st.counters.batches, f"{len(flushes)} flush marks for {st.counters.batches} batches")
    drawn = {el.get("data-name") for el in root.iter(f"{svg}polyline") if el.get("class") == "exits-device"}
    check(run, {"serial", "pci-conf1"} <= drawn, f"timeline devices {drawn}")


def _check_poweroff(run) -> None:
    """Exit status 0 because the guest powered off (a SIGTERM stop also exits 0)."""
    check(run, "end action=poweroff" in init_lines(run), "the init did not reach its poweroff")
    check(run, "powered off" in run.stderr, "minivmm did not report that the guest powered off")
    check(run, run.stop_reason == "guest powered off (ACPI S5)", f"--stats-json says the run ended by {run.stop_reason!r}")
    check(run, run.status == 0, f"minivmm exited {run.status}, not 0, after the guest's poweroff")


def _check_steps_passed(run, n_steps: int) -> None:
    check(run, f"done ok={n_steps} failed=0" in init_lines(run), f"not all {n_steps} init steps passed")
    failed = [line for line in init_lines(run) if "FAILED" in line]
    check(run, not failed, "init steps failed: " + " | ".join(failed))


def _check_dax_mount(run) -> None:
    mount = init_line(run, "pmem-mount ")
    check(run, mount is not None, "no pmem-mount result line")
    check(
        run,
        mount.startswith("pmem-mount dev=/dev/pmem0 dir=/mnt dax=1"),
        f"/dev/pmem0 was not mounted with DAX: {mount!r}",
    )


DAX_MIB = 32  # 16 PMD faults; with 4 KiB faults it would be 8192 (10-70 ms each here)
DAX_MAX_FAULTS = 64  # the 16, plus a few for the step's own stack and code pages


def _check_pmd_faults(run) -> None:
    """The first touch of a fallocated DAX_MIB file through a DAX mapping (ext4 picks a
    2 MiB-aligned address), and of a new mapping of it once written, took 2 MiB (PMD) faults:
    every 2 MiB piece of the file had a 2 MiB-aligned extent and the page faults were about
    one per piece, where 4 KiB faults would be 256 per MiB. (thp_fallback, the PMD faults
    the kernel turned into 4 KiB ones, is -1 when the guest kernel keeps no event counters.)"""
    pieces = DAX_MIB // 2
    for kind in ("first-touch", "map-touch"):
        touch = init_line(run, f"dax-mmap {kind} ")
        check(run, touch is not None, f"no dax-mmap {kind} line")
        f = dict(re.findall(r"(\w+)=(-?\w+)", touch))
        check(run, f.get("map") == "auto" and f.get("addr_2m") == "1", f"the DAX mapping is not 2 MiB aligned: {touch!r}")
        check(run, f.get("pieces") == str(pieces) and f.get("pmd_ready") == str(pieces),
              f"not every 2 MiB of the file has a 2 MiB-aligned extent: {touch!r}")  # fmt: skip
        check(run, int(f.get("faults", "-1")) in range(pieces, DAX_MAX_FAULTS + 1),
              f"expected {pieces}..{DAX_MAX_FAULTS} page faults for {DAX_MIB} MiB with 2 MiB pages: {touch!r}")  # fmt: skip
        check(run, f.get("thp_fallback") in ("0", "-1"), f"PMD faults fell back to 4 KiB pages: {touch!r}")
    check(run, init_line(run, f"dax-mmap end mib={DAX_MIB} ") is not None, "the dax-mmap rewrite did not finish")


def test_user_space_two_devices_persist_then_discard_writes(tmp_path):
    """Boot 1 writes a token through a DAX mount of pmem0 next to a second, new device, and
    first-touches a DAX mapping with 2 MiB faults;
    boot 2 (same image, discard-writes=on) reads it back and writes one that never lands."""
    guest = default_guest()
    img0 = make_ext4(tmp_path / "pmem0.ext4", 128 * MiB)
    img1 = tmp_path / "pmem1.img"  # created by minivmm
    token = f"tok{secrets.token_hex(8)}"
    token2 = f"tok2{secrets.token_hex(8)}"
    assert token != token2

    # ---- boot 1: two devices, write through DAX, flushes from 4 threads at once
    steps = ["hello", "mounts", "pmem-list", "pmem-mount", f"pmem-write:{token}", "pmem-read", f"dax-mmap:{DAX_MIB}",
             "flush-threads:4x4", "umount"]
    run = run_minivmm(
        tmp_path,
        "user-write",
        [
            "--kernel", str(guest["vmlinux"]),
            "--initrd", str(guest["initrd"]),
            "--pmem", str(img0),
            "--pmem", f"{img1},size=64M",
            "--cmdline",
            f"{BASE_CMDLINE} rdinit=/sbin/minivmm-test minivmm.steps={','.join(steps)} minivmm.end=poweroff",
        ],
    )  # fmt: skip
    _check_poweroff(run)
    check(run, img1.is_file() and img1.stat().st_size == 64 * MiB, f"{img1} not created at 64 MiB")

    listed = init_lines_with(run, "pmem-list dev=")
    check(
        run,
        sorted(listed) == ["pmem-list dev=pmem0 bytes=134217728 dax=1", "pmem-list dev=pmem1 bytes=67108864 dax=1"],
        f"expected pmem0 = 128 MiB and pmem1 = 64 MiB, both DAX-capable, in --pmem order; got {listed}",
    )
    check(run, "pmem-list count=2" in init_lines(run), "the guest does not see exactly two pmem devices")
    # The guest kernel enumerated bus 0 through conf1: the host bridge and one virtio-pmem-pci
    # function per --pmem (virtio 1.x modern: device 0x1040 + 27, class 0xff0000), in order.
    for bdf, ids, cls in (("00:00.0", "1b36:0008", "0x060000"), ("00:01.0", "1af4:105b", "0xff0000"), ("00:02.0", "1af4:105b", "0xff0000")):
        check(run, f"pci 0000:{bdf}: [{ids}] type 00 class {cls}" in run.stdout, f"the guest kernel did not enumerate {bdf} as [{ids}] class {cls}")
    _check_dax_mount(run)
    check(run, f"pmem-write token={token}" in init_lines(run), "the token was not written (and fsynced)")
    check(run, f"pmem-read token={token}" in init_lines(run), "the token was not read back in the guest")
    _check_pmd_faults(run)
    check(run, init_line(run, "flush-threads threads=4 n=4 ") is not None, "flush-threads:4x4 did not complete")
    check(run, "umount dir=/mnt" in init_lines(run), "/mnt was not unmounted")
    _check_steps_passed(run, len(steps))

    # The host sees the token in the backing file, read with debugfs (no mount).
    on_host = cat_file(img0, TOKEN_PATH_IN_FS)
    check(run, on_host == f"{token}\n", f"{img0}:{TOKEN_PATH_IN_FS} holds {on_host!r}, not the token")

    st0 = pmem_stats(run, "pmem0")
    check(run, st0.path == str(img0), f"pmem0 is backed by {st0.path}, not {img0}")
    check(run, st0.counters.flush_requests >= 1 and st0.counters.host_fsyncs >= 1, f"pmem0: no flushes or no host fsyncs ({st0})")
    check(run, st0.counters.host_fsyncs <= st0.counters.flush_requests, f"pmem0: more host fsyncs than flush requests ({st0})")
    st1 = pmem_stats(run, "pmem1")
    check(run, st1.path == str(img1), f"pmem1 is backed by {st1.path}, not {img1}")

    # ---- boot 2: same image, discard-writes=on
    digest = sha256(img0)
    steps = ["pmem-mount", "pmem-read", f"pmem-write:{token2}", "pmem-read", "umount"]
    run = run_minivmm(
        tmp_path,
        "user-discard",
        [
            "--kernel", str(guest["vmlinux"]),
            "--initrd", str(guest["initrd"]),
            "--pmem", f"{img0},discard-writes=on",
            "--cmdline",
            f"{BASE_CMDLINE} rdinit=/sbin/minivmm-test minivmm.steps={','.join(steps)} minivmm.end=poweroff",
        ],
    )  # fmt: skip
    _check_poweroff(run)
    mount = init_line(run, "pmem-mount ")
    check(run, mount is not None and mount.startswith("pmem-mount dev=/dev/pmem0 dir=/mnt dax="), f"mount failed: {mount!r}")
    reads = init_lines_with(run, "pmem-read ")
    check(
        run,
        reads == [f"pmem-read token={token}", f"pmem-read token={token2}"],
        f"expected the first boot's token, then the new one; got {reads}",
    )
    check(run, f"pmem-write token={token2}" in init_lines(run), "the guest could not write (and fsync) token2")
    check(run, "umount dir=/mnt" in init_lines(run), "/mnt was not unmounted")
    _check_steps_passed(run, len(steps))

    check(run, sha256(img0) == digest, f"{img0} changed during a discard-writes=on boot")
    st = pmem_stats(run, "pmem0")
    check(run, st.counters.flush_requests >= 1, f"no flush requests with discard-writes=on ({st})")
    check(run, st.counters.host_fsyncs == 0, f"discard-writes=on made host fsyncs ({st})")


def test_pci_nomsi_pmem_works_over_intx(tmp_path):
    """``pci=nomsi``: the guest cannot use MSI-X, so virtio_pci falls back to the function's
    INTx pin (INTA#, routed by the DSDT's _PRT to the GSI minivmm asserts). /dev/pmem0 must
    appear, mount with DAX, and its flushes must complete: every fsync below waits for the
    request's completion interrupt, which can only arrive through INTx here."""
    guest = default_guest()
    img = make_ext4(tmp_path / "intx.ext4", 64 * MiB)
    token = f"intx{secrets.token_hex(8)}"
    steps = ["hello", "pmem-list", "pmem-mount", f"pmem-write:{token}", "pmem-read", "flush-threads:2x4", "umount"]
    run = run_minivmm(
        tmp_path,
        "nomsi",
        [
            "--kernel", str(guest["vmlinux"]),
            "--initrd", str(guest["initrd"]),
            "--pmem", str(img),
            "--cmdline",
            f"{BASE_CMDLINE} pci=nomsi rdinit=/sbin/minivmm-test minivmm.steps={','.join(steps)} minivmm.end=poweroff",
            "--stats",
        ],
    )  # fmt: skip
    _check_poweroff(run)
    check(run, "pci=nomsi" in run.stdout, "the guest kernel's command line does not show pci=nomsi")
    check(
        run,
        init_lines_with(run, "pmem-list dev=") == ["pmem-list dev=pmem0 bytes=67108864 dax=1"],
        f"pmem0 (64 MiB, DAX) missing under pci=nomsi: {init_lines_with(run, 'pmem-list')}",
    )
    check(run, not re.search(r"virtio_pmem.*(fail|error)", run.stdout, re.IGNORECASE), "virtio_pmem reported a failure")
    _check_dax_mount(run)
    check(run, f"pmem-write token={token}" in init_lines(run), "the token was not written and fsynced over INTx")
    check(run, f"pmem-read token={token}" in init_lines(run), "the token was not read back")
    check(run, init_line(run, "flush-threads threads=2 n=4 ") is not None, "flush-threads:2x4 did not complete over INTx")
    _check_steps_passed(run, len(steps))
    on_host = cat_file(img, TOKEN_PATH_IN_FS)
    check(run, on_host == f"{token}\n", f"{img}:{TOKEN_PATH_IN_FS} holds {on_host!r}, not the token")
    st = pmem_stats(run, "pmem0")
    check(run, st.counters.flush_requests >= 2 and st.counters.host_fsyncs >= 1, f"too few flushes served over INTx ({st})")
