"""The virtio-pmem device (virtio 1.2 section 5.19) and its flush loop.

The guest maps the backing file directly (the machine puts its mmap in a KVM memory slot at
``start``); the device only describes that range in its configuration space (5.19.4) and
serves flush requests on its single request queue (5.19.2, 5.19.6): each request is a
device-readable ``struct virtio_pmem_req`` followed by a device-writable
``struct virtio_pmem_resp``. A VIRTIO_PMEM_REQ_TYPE_FLUSH is answered ``ret = 0`` once every
guest write made before it is durable in the backing file, which is what ``fdatasync`` of a
MAP_SHARED file guarantees; Linux (drivers/nvdimm/nd_virtio.c) turns a non-zero ``ret`` into
-EIO for the guest's fsync.

Threading design. The flush must not run on a vCPU thread (the guest's notify write is a KVM
ioeventfd, so it never reaches Python anyway) nor on the shared `EventLoop` thread, which also
serves the serial console: an fsync can take seconds. Each active device therefore owns one
*flusher thread* that waits with `selectors` on the queue's notify eventfd and on a private
stop pipe. When the eventfd fires the thread:

1. reads the eventfd, clearing it (so a notify arriving from now on wakes it again);
2. pops every available request (group commit: one batch);
3. runs ONE ``os.fdatasync`` covering all FLUSH requests of the batch;
4. writes each ``ret``, `add_used` each chain, and calls ``signal_used(0)`` once.

Requests made available while step 3 runs wait for the next batch, so an acknowledged request
was always covered by an fsync that began after the request was popped, hence after it
arrived.

Reset (2.4) never waits on the vCPU thread: `begin_reset` writes the stop pipe and returns;
the thread finishes the batch it is in (a running fsync completes first) and exits.
`reset_done` is true once it has exited, so from then on the device no longer touches guest
memory nor interrupts; the transport reports device_status 0 only then. `reset` waits.

Sticky flush failure. When ``fdatasync`` fails, Linux has already marked the pages that could
not be written back clean: a later ``fdatasync`` succeeds although that data is lost (the
"fsyncgate" lesson; PostgreSQL and QEMU's file-posix treat a failed flush as permanent). So the
first failure is remembered for the life of the device object - across device resets, since it
is a property of the backing file, not of the queue - and every later FLUSH is answered with
VIRTIO_PMEM_RESP_ERR without calling the host again. It is said once on stderr (device id,
file, errno) and shown in `stats()` as ``flush_failed_errno``. `fail_flushes` lets the machine
make the failure sticky for other reasons (e.g. a guest page the host could not back).
"""

from __future__ import annotations

import errno
import os
import selectors
import struct
import sys
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from ...errors import report_thread_error
from ...memory import GuestMemory
from ...stats import PmemStats
from ...timeline import FlushRecord
from .queue import DescriptorChain, Virtqueue, VirtqueueError

if TYPE_CHECKING:
    from ...pmemfile import PmemBacking

VIRTIO_ID_PMEM = 27  # 5 Device Types
VIRTIO_PMEM_F_SHMEM_REGION = 1 << 0  # 5.19.3: not offered; the range is given in config
VIRTIO_PMEM_REQ_TYPE_FLUSH = 0  # 5.19.6
VIRTIO_PMEM_RESP_OK = 0
VIRTIO_PMEM_RESP_ERR = 1  # any non-zero ret is an error to the driver

PMEM_QUEUE_SIZE = 256

# 5.19.4 struct virtio_pmem_config { le64 start; le64 size; };
virtio_pmem_config = struct.Struct("<QQ")
# 5.19.6 struct virtio_pmem_req { le32 type; };  struct virtio_pmem_resp { le32 ret; };
virtio_pmem_req = struct.Struct("<I")
virtio_pmem_resp = struct.Struct("<I")


class FlushTarget(Protocol):
    """What a FLUSH does instead of fdatasync(fd) (e.g. `minivmm.powerfail.DirtyPageCopier`):
    returns once every guest write made before the call is durable; OSError if not."""

    def flush(self) -> None: ...


class VirtioPmem:
    """A virtio-pmem device for one backing file (implements `VirtioDevice`).

    `fd` is the backing file's descriptor (the device fdatasyncs it and never closes it);
    `start`/`size` are the guest-physical range where the machine mapped the file; `path`
    names the file in messages. With `discard_writes` a flush succeeds without touching the file.
    """

    device_id = VIRTIO_ID_PMEM
    device_features = 0
    queue_max_sizes: Sequence[int] = (PMEM_QUEUE_SIZE,)

    def __init__(
        self, fd: int, start: int, size: int, *, discard_writes: bool = False, name: str = "pmem", path: str = "",
        flush_target: FlushTarget | None = None,
    ) -> None:  # fmt: skip
        self.fd = fd
        self.path = path
        self.flush_target = flush_target  # lose-unflushed: copies the dirtied pages, then fdatasync
        self.start = start
        self.size = size
        self.discard_writes = discard_writes
        self.name = name
        self._config = virtio_pmem_config.pack(start, size)
        self._stats = PmemStats()
        self._stats_lock = threading.Lock()
        self._flusher: _Flusher | None = None
        self._stopping: list[_Flusher] = []  # asked to stop, maybe still finishing a batch
        self.errors: list[BaseException] = []  # unexpected exceptions in the flusher thread
        self.flush_times: list[FlushRecord] | None = None  # every served batch, only for --timeline

    @classmethod
    def from_backing(cls, backing: PmemBacking, start: int, flush_target: FlushTarget | None = None) -> VirtioPmem:
        """The device for a `minivmm.pmemfile.PmemBacking` mapped at guest address `start`."""
        return cls(backing.fd, start, backing.size, discard_writes=backing.discard_writes, name=backing.id,
                   path=str(backing.path), flush_target=flush_target)  # fmt: skip

    # -- configuration space (5.19.4) -------------------------------------------------

    def read_config(self, offset: int, size: int) -> int:
        """Little-endian bytes [offset, offset+size) of virtio_pmem_config; bytes beyond it read 0."""
        if offset < 0 or size <= 0:
            return 0
        data = self._config[offset : offset + size] if offset < len(self._config) else b""
        return int.from_bytes(data, "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """The configuration is read-only (5.19.4); writes are ignored."""

    # -- lifecycle ----------------------------------------------------------------------

    def activate(
        self,
        mem: GuestMemory,
        queues: Sequence[Virtqueue],
        notify_fds: Sequence[int],
        signal_used: Callable[[int], None],
        needs_reset: Callable[[], None],
    ) -> None:
        """Start the flusher thread on request queue 0, woken by `notify_fds[0]`."""
        if len(queues) != 1 or len(notify_fds) != 1:
            raise ValueError(f"virtio-pmem has one queue, got {len(queues)} queues / {len(notify_fds)} fds")
        self.reset()
        self._flusher = _Flusher(self, queues[0], notify_fds[0], signal_used, needs_reset)
        self._flusher.start()

    def begin_reset(self) -> None:
        """Ask the flusher thread to stop and forget the queue; returns at once."""
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.request_stop()
            self._stopping.append(flusher)

    def reset_done(self) -> bool:
        """True once every flusher asked to stop has exited (it writes nothing after that)."""
        self._stopping = [f for f in self._stopping if not f.reap()]
        return not self._stopping

    def reset(self) -> None:
        """Stop and join the flusher thread and forget the queue; `activate` works again after."""
        self.begin_reset()
        for flusher in self._stopping:
            flusher.join()
        self._stopping = []

    @property
    def active(self) -> bool:
        return self._flusher is not None

    def stats(self) -> PmemStats:
        """A snapshot of the counters (safe to call from any thread)."""
        with self._stats_lock:
            return replace(self._stats)

    # -- request handling (runs on the flusher thread) ------------------------------------

    @property
    def flush_failed_errno(self) -> int:
        """The errno that made flushes fail for good, or 0 (see "Sticky flush failure")."""
        with self._stats_lock:
            return self._stats.flush_failed_errno

    def fail_flushes(self, err: int, why: str) -> None:
        """From now on every FLUSH is answered with an error; the first call says so on stderr.

        Safe from any thread. `err` is an errno value, `why` what failed (for the message)."""
        err = err or errno.EIO
        with self._stats_lock:
            first = self._stats.flush_failed_errno == 0
            if first:
                self._stats.flush_failed_errno = err
        if first:
            print(
                f"minivmm: pmem {self.name} ({self.path or f'fd {self.fd}'}): {why} failed: "
                f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)}); every later flush of this device fails",
                file=sys.stderr,
                flush=True,
            )

    def _sync(self) -> bool:
        """One host flush for a batch; False if the host reported an I/O error now or before."""
        if self.flush_failed_errno:
            return False  # sticky: the data a failed writeback dropped is not on disk
        if self.discard_writes:
            return True
        t0 = time.monotonic()
        failure: OSError | None = None
        try:
            if self.flush_target is not None:
                self.flush_target.flush()  # lose-unflushed: copy the dirtied pages, then fdatasync
            else:
                os.fdatasync(self.fd)
        except OSError as exc:
            failure = exc
        took = time.monotonic() - t0
        with self._stats_lock:
            st = self._stats
            st.host_fsyncs += 1
            st.fsync_errors += failure is not None
            st.fsync_time_total += took
            st.fsync_time_max = max(st.fsync_time_max, took)
        if failure is not None:
            self.fail_flushes(failure.errno or errno.EIO, "fdatasync")
            return False
        return True

    def process_batch(self, queue: Virtqueue, signal_used: Callable[[int], None], woke: float) -> bool:
        """Serve every available request with one host flush; True if the queue is still usable.

        A malformed chain raises nothing: requests popped before it are completed, then the
        caller is told (False) to set DEVICE_NEEDS_RESET and stop serving the queue.
        """
        batch: list[tuple[DescriptorChain, int]] = []
        healthy = True
        try:
            for _ in range(queue.size):  # bounded even if a hostile driver keeps adding
                chain = queue.pop()
                if chain is None:
                    break
                if chain.readable_len < virtio_pmem_req.size or chain.writable_len < virtio_pmem_resp.size:
                    raise VirtqueueError(f"pmem request {chain.head}: need 4 readable and 4 writable bytes")
                (req_type,) = virtio_pmem_req.unpack(chain.read(virtio_pmem_req.size))
                batch.append((chain, req_type))
        except VirtqueueError:
            healthy = False
        if not healthy:
            with self._stats_lock:
                self._stats.malformed += 1
        if not batch:
            return healthy
        flushes = sum(t == VIRTIO_PMEM_REQ_TYPE_FLUSH for _, t in batch)
        ok = self._sync() if flushes else True
        try:
            for chain, req_type in batch:
                good = req_type == VIRTIO_PMEM_REQ_TYPE_FLUSH and ok
                chain.write(virtio_pmem_resp.pack(VIRTIO_PMEM_RESP_OK if good else VIRTIO_PMEM_RESP_ERR))
                queue.add_used(chain.head, virtio_pmem_resp.size)
        except VirtqueueError:
            healthy = False
        if queue.needs_notification():
            signal_used(0)  # an irqfd write: KVM injects the MSI-X vector
        done = time.monotonic()
        with self._stats_lock:
            st = self._stats
            st.flush_requests += flushes
            st.bad_requests += len(batch) - flushes
            st.batches += 1
            st.service_time_total += done - woke
            st.service_time_max = max(st.service_time_max, done - woke)
        if self.flush_times is not None and flushes:
            self.flush_times.append(FlushRecord(woke, done, flushes))
        return healthy


class _Flusher:
    """The per-device thread: selectors on (notify eventfd, stop pipe)."""

    def __init__(
        self,
        dev: VirtioPmem,
        queue: Virtqueue,
        notify_fd: int,
        signal_used: Callable[[int], None],
        needs_reset: Callable[[], None],
    ) -> None:
        self.dev = dev
        self.queue = queue
        self.notify_fd = notify_fd
        self.signal_used = signal_used
        self.needs_reset = needs_reset
        self.stop_r, self.stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"minivmm-{dev.name}-flush", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def request_stop(self) -> None:
        """Ask the thread to exit; it finishes its current batch (and fsync) first."""
        self.stopping.set()
        os.write(self.stop_w, b"x")

    def reap(self) -> bool:
        """True (and the stop pipe closed) if the thread has exited; never blocks."""
        if self.thread.is_alive():
            return False
        self.join()
        return True

    def join(self) -> None:
        """Wait for the thread to exit, then close the stop pipe."""
        if self.thread is threading.current_thread():
            return  # reset from a callback on this thread: it exits when the callback returns
        self.thread.join()
        if self.stop_r >= 0:
            os.close(self.stop_r)
            os.close(self.stop_w)
            self.stop_r = self.stop_w = -1

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(self.stop_r, selectors.EVENT_READ, "stop")
            sel.register(self.notify_fd, selectors.EVENT_READ, "notify")
            woke = time.monotonic()  # first pass: requests made available before DRIVER_OK
            while not self.stopping.is_set():
                if not self._serve(woke):
                    break  # broken queue: not served until reset; only wait for stop
                events = sel.select()
                woke = time.monotonic()
                if any(key.data == "stop" for key, _ in events):
                    return
                try:
                    os.eventfd_read(self.notify_fd)  # clear before popping: later notifies wake us again
                except BlockingIOError:
                    pass
            if not self.stopping.is_set():
                sel.unregister(self.notify_fd)
                sel.select()  # only the stop pipe is left
        except Exception as exc:  # e.g. the notify fd was closed under us: report, stop serving
            report_thread_error(f"{self.dev.name} flusher", exc, self.dev.errors)
            self.needs_reset()
        finally:
            sel.close()

    def _serve(self, woke: float) -> bool:
        """Process batches until the queue is empty; False once the queue is broken."""
        try:
            while not self.stopping.is_set():
                if not self.dev.process_batch(self.queue, self.signal_used, woke):
                    self.needs_reset()
                    return False
                if self.queue.pending() == 0:
                    break
                woke = time.monotonic()
            return True
        except VirtqueueError:
            self.needs_reset()
            return False
        except Exception as exc:  # a device bug: keep the VMM alive, report it
            report_thread_error(f"{self.dev.name} flusher", exc, self.dev.errors)
            self.needs_reset()
            return False
