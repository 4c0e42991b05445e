"""Power-failure simulation for virtio-pmem (``--pmem PATH,lose-unflushed=on``).

The guest's writes go to a private copy-on-write mapping of the backing file (MAP_PRIVATE of
an O_RDWR fd), so the file only changes when the host copies into it. The memory slot is
registered with KVM_MEM_LOG_DIRTY_PAGES (api.rst 4.35), and a guest FLUSH (virtio 1.2
section 5.19.6) becomes `DirtyPageCopier.flush`: fetch-and-clear the slot's dirty bitmap
(KVM_GET_DIRTY_LOG, api.rst 4.8), copy exactly those pages from the private mapping into the
file with pwrite, fdatasync, then answer. Because the log is cleared BEFORE the pages are
copied, a guest store racing with a flush is either in the copied bytes or sets its bit again
and goes with the next flush; it is never lost.

Whatever ends the run without a flush (Ctrl-A x, quit, a signal, SIGKILL, a host crash) leaves
the file as the last completed flush wrote it: nothing else ever writes it. `power_cut` is the
deliberate version: it refuses every later flush and counts the pages the guest had dirtied.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .flushlog import FlushLogWriter
from .kvm import DIRTY_LOG_PAGE_SIZE

PAGE_SIZE = DIRTY_LOG_PAGE_SIZE


def dirty_pages(bitmap: bytes, npages: int) -> list[int]:
    """Indices of the set bits of a KVM dirty bitmap (bit i of byte i // 8), below `npages`."""
    pages: list[int] = []
    for byte_index, byte in enumerate(bitmap):
        while byte:
            low = byte & -byte
            page = byte_index * 8 + low.bit_length() - 1
            if page < npages:
                pages.append(page)
            byte ^= low
    return pages


def page_runs(pages: list[int]) -> list[tuple[int, int]]:
    """Ascending page indices -> (first page, count) of each contiguous run (one pwrite each)."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


@dataclass
class CopierStats:
    """What the flushes cost the host: pages written, time from log fetch to fdatasync's end."""

    flushes: int = 0
    pages_copied: int = 0
    max_pages: int = 0
    copy_time_total: float = 0.0


class PowerCutError(OSError):
    """A flush after the power was cut: the device answers it with an error."""


class DirtyPageCopier:
    """The flush target of a lose-unflushed pmem device.

    `fetch_dirty()` returns (and clears) the slot's dirty bitmap; `source` is the private
    mapping the guest writes; `fd` the backing file opened read/write. One lock serialises
    flushes and the power cut, so a cut waits for a flush in progress to complete."""

    def __init__(
        self, fd: int, source: memoryview, fetch_dirty: Callable[[], bytes], log: FlushLogWriter | None = None
    ) -> None:
        self.fd = fd
        self.source = source
        self.npages = len(source) // PAGE_SIZE
        self.fetch_dirty = fetch_dirty
        self.log = log
        self.epoch = 0
        self.stats = CopierStats()
        self.cut = False
        self._lock = threading.Lock()

    def flush(self) -> None:
        """Make every guest write made before this call durable in the file (OSError if not)."""
        with self._lock:
            if self.cut:
                raise PowerCutError("the power was cut")
            t0 = time.monotonic()
            pages = dirty_pages(self.fetch_dirty(), self.npages)  # clears the log: before the copy
            offsets: list[int] = []
            contents: list[bytes] = []
            for first, count in page_runs(pages):
                start = first * PAGE_SIZE
                data = bytes(self.source[start : start + count * PAGE_SIZE])  # one snapshot for file and log
                self._pwrite_all(data, start)
                offsets.extend(range(start, start + len(data), PAGE_SIZE))
                contents.extend(data[i : i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE))
            os.fdatasync(self.fd)
            self.epoch += 1
            if self.log is not None:
                self.log.append(self.epoch, offsets, contents)
            st = self.stats
            st.flushes += 1
            st.pages_copied += len(pages)
            st.max_pages = max(st.max_pages, len(pages))
            st.copy_time_total += time.monotonic() - t0

    def _pwrite_all(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def cut_power(self) -> None:
        """Refuse every later flush (waits for a flush in progress to complete)."""
        with self._lock:
            self.cut = True

    def dropped_pages(self) -> int:
        """How many pages the guest dirtied since the last flush (they never reach the file)."""
        with self._lock:
            return len(dirty_pages(self.fetch_dirty(), self.npages))

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
