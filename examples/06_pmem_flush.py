"""Tutorial step 6: virtio-pmem - the guest's fsync becomes a FLUSH that never exits to the
VMM's vCPU thread.

One boot of the default guest with a fresh ext4 image as /dev/pmem0 (`--pmem`), traced
(`--trace` keeps every exit in the --stats-json file). The test init mounts it and runs
flush-bench: N times a 4 KiB write and fdatasync. Each fdatasync reaches the virtio-pmem
driver as FLUSH requests; the driver notifies the device by writing its queue's notify
address, which KVM turns into an eventfd signal (ioeventfd) instead of an exit; the VMM's
flusher thread wakes up, calls fdatasync on the backing file, puts the answer in the used
ring and signals the queue's MSI-X vector through an irqfd, which KVM injects. The step
sorts the pmem device's exits made while the flushes ran by the register they touched.

Run from a minivmm checkout, after `make guest`: PYTHONPATH=. .venv/bin/python examples/06_pmem_flush.py
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from linux_boot import boot, exits_window, init_lines, make_ext4

from minivmm.devices.virtio.pci import COMMON_CFG_OFFSET, ISR_CFG_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_CFG_OFFSET, VIRTIO_BAR_SIZE
from minivmm.stats import MachineStats

N = 50  # guest write + fdatasync pairs
DEVICE_STATUS = 0x14  # struct virtio_pci_common_cfg.device_status (virtio 1.2, 4.1.4.3)


def bar_register(offset: int) -> str:
    """A name for an offset in the virtio-pci BAR (minivmm/devices/virtio/pci.py's layout)."""
    page = offset & ~0xFFF
    if page == COMMON_CFG_OFFSET:
        return "common_cfg.device_status" if offset == DEVICE_STATUS else f"common_cfg+{offset:#x}"
    names = {ISR_CFG_OFFSET: "isr", NOTIFY_CFG_OFFSET: "notify", MSIX_TABLE_OFFSET: "msix"}
    return names.get(page, f"bar+{offset:#x}")


def report(console: str, stats_text: str, stats: MachineStats) -> None:
    """Print what the step shows, from the run's console, its --stats text and --stats-json."""
    lines = init_lines(console)
    mount = next(line for line in lines if line.startswith("pmem-mount"))
    bench = next(line for line in lines if line.startswith("flush-bench"))
    print("guest:", mount)
    print("guest:", bench.split(" ns_per_op")[0], "(4 KiB writes, each followed by fdatasync)")
    # --stats prints a line per device the vCPU exited to; the pmem device's BAR is among them:
    # the driver probes the device and sets up its queue through exits, before any flush.
    print("--stats lists exits to the pmem device:", any("device pci-" in s and "pmem" in s for s in stats_text.splitlines()))
    log = stats.vcpus[0].exit_log
    assert log is not None, "run with --trace: the exit log is in --stats-json"
    begin, end = exits_window(log, mount + "\r\n", "minivmm-test: flush-bench")
    pmem = [r for r in log[begin:end] if "pmem" in r.device]
    by_register = Counter(f"{r.op} {bar_register(r.addr % VIRTIO_BAR_SIZE)}" for r in pmem)
    print(f"while the {N} fdatasyncs ran, exits to the pmem device by register: {sorted(by_register)}")
    print(f"  notify writes: {by_register['write notify']}, ISR reads: {by_register['read isr']}")
    counters = stats.pmem[0].counters
    print(f"  status reads, at most one per flush request: {len(pmem) <= counters.flush_requests}")
    print(f"flush requests the flusher thread completed: at least {N}: {counters.flush_requests >= N}")
    print(f"host fdatasyncs: at least one, at most one per request: {1 <= counters.host_fsyncs <= counters.flush_requests}")
    print("stop:", stats.stop_reason)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        image = make_ext4(Path(tmp) / "pmem.img")
        run = boot(Path(tmp), f"pmem-mount,flush-bench:{N},umount", "--pmem", str(image), "--trace", "--stats")
    assert run.stats is not None
    report(run.stdout, run.stderr, run.stats)


if __name__ == "__main__":
    main()
