"""Tutorial step 6: virtio-pmem - the guest's fsync becomes a FLUSH that never exits to the
VMM's vCPU thread.

One boot of the default guest with a fresh ext4 image as /dev/pmem0 (`--pmem`), traced
(`--trace` keeps every exit in the --stats-json file). The test init mounts it and runs
flush-bench: N times a 4 KiB write and fdatasync. Each fdatasync reaches the virtio-pmem
driver as a FLUSH request; the driver notifies the device by writing its queue's notify
address, which KVM turns into an eventfd signal (ioeventfd) instead of an exit; the VMM's
flusher thread wakes up, calls fdatasync on the backing file, puts the answer in the used
ring and signals the interrupt's eventfd (irqfd), which KVM injects. The vCPU thread is never
involved: the exit log shows no access to the pmem device while the flushes run.

Run from a minivmm checkout, after `make guest`: PYTHONPATH=. python examples/06_pmem_flush.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from linux_boot import boot, exits_between, init_lines, make_ext4

N = 50  # guest write + fdatasync pairs


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        image = make_ext4(Path(tmp) / "pmem.img")
        run = boot(Path(tmp), f"pmem-mount,flush-bench:{N},umount", "--pmem", str(image), "--trace", "--stats")
    lines = init_lines(run)
    mount = next(line for line in lines if line.startswith("pmem-mount"))
    bench = next(line for line in lines if line.startswith("flush-bench"))
    print("guest:", mount)
    print("guest:", bench.split(" ns_per_op")[0], "(writes + fdatasyncs)")
    # --stats prints a line per device the vCPU exited to; the pmem device's BARs are among them
    # (the driver probes it and sets up its queue through MMIO exits, before any flush).
    pmem_lines = [line.strip() for line in run.stderr.splitlines() if line.strip().startswith("device pci-") and "pmem" in line]
    print("--stats lists exits to the pmem device (probe and queue set-up):", bool(pmem_lines))
    log = run.stats.vcpus[0].exit_log
    assert log is not None
    _, others = exits_between(log, mount + "\r\n", "minivmm-test: flush-bench")
    during = sum(n for device, n in others.items() if "pmem" in device)
    print(f"exits to the pmem device while the {N} flushes ran: {during}")
    pmem = run.stats.pmem[0].counters
    print(f"flush requests the flusher thread completed: at least {N}: {pmem.flush_requests >= N}")
    print(f"host fdatasyncs: at least one, at most one per request: {1 <= pmem.host_fsyncs <= pmem.flush_requests}")
    print("stop:", run.stop_reason)


if __name__ == "__main__":
    main()
