"""The pmem flush log: one record per completed guest flush, and its replay.

``--pmem PATH,lose-unflushed=on,flush-log=FILE`` writes FILE (created or truncated at start).
Everything is little-endian:

    file header   struct flushlog_header { char magic[8] = "MVPMFLG1"; le32 version = 1;
                                           le32 page_size; le64 image_size; }        (24 bytes)
    each record   struct flushlog_record { char magic[4] = "FLSH"; le32 npages; le64 epoch;
                                           le32 crc32; le32 reserved = 0; }          (24 bytes)
                  le64 offset[npages]          byte offsets in the image, ascending
                  u8   data[npages][page_size] each page's contents as the flush wrote them

``crc32`` is zlib's CRC-32 of the record header (with ``crc32`` = 0), the offsets and the
data. Epochs count the run's completed flushes from 1; epoch 0 is the image at start. A
record is appended (and the log fdatasync'ed) after the image's own fdatasync returned, so a
record in the log is a flush the guest was, or was about to be, told succeeded.

`replay` applies the records with epoch <= upto to a copy of the starting image; a log that
ends in a partial record (the VMM was killed while appending) or holds a record whose magic or
checksum is wrong is replayed up to its last whole record, with one warning line.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator, Sequence

from .errors import UserError

FLUSHLOG_MAGIC = b"MVPMFLG1"
FLUSHLOG_VERSION = 1
RECORD_MAGIC = b"FLSH"
flushlog_header = struct.Struct("<8sIIQ")
flushlog_record = struct.Struct("<4sIQII")


def record_bytes(epoch: int, offsets: Sequence[int], pages: Sequence[bytes]) -> bytes:
    """One whole record (header, offsets, data) with its checksum."""
    body = struct.pack(f"<{len(offsets)}Q", *offsets) + b"".join(pages)
    crc = zlib.crc32(body, zlib.crc32(flushlog_record.pack(RECORD_MAGIC, len(offsets), epoch, 0, 0)))
    return flushlog_record.pack(RECORD_MAGIC, len(offsets), epoch, crc, 0) + body


class FlushLogWriter:
    """Appends records to an open log file (one per completed flush); `close()` closes it."""

    def __init__(self, path: str, page_size: int, image_size: int, image_fd: int | None = None) -> None:
        """Create or truncate `path`; refused (UserError) if it is the image open at `image_fd`."""
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UserError(f"flush-log {path}: {exc.strerror}") from None
        if image_fd is not None and os.path.samestat(os.fstat(self.fd), os.fstat(image_fd)):
            os.close(self.fd)
            raise UserError(f"flush-log {path}: that is the pmem image itself")
        os.ftruncate(self.fd, 0)
        self.path = path
        self.page_size = page_size
        os.write(self.fd, flushlog_header.pack(FLUSHLOG_MAGIC, FLUSHLOG_VERSION, page_size, image_size))

    def append(self, epoch: int, offsets: Sequence[int], pages: Sequence[bytes]) -> None:
        data = record_bytes(epoch, offsets, pages)
        view = memoryview(data)
        while view:  # a short write to a regular file is possible (e.g. a full disk): finish it
            view = view[os.write(self.fd, view) :]
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class FlushRecord:
    epoch: int
    offsets: list[int]
    pages: list[bytes] = field(repr=False)


@dataclass
class FlushLog:
    """A read log: its header fields, its whole records, and why reading stopped early (if it did)."""

    page_size: int
    image_size: int
    records: list[FlushRecord]
    warning: str | None = None


def _read_exact(f: BinaryIO, n: int) -> bytes | None:
    data = f.read(n)
    return data if len(data) == n else None


def _open_log(path: str) -> tuple[BinaryIO, int, int]:
    """The log open at its first record, its page size and image size (UserError if it is no log)."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise UserError(f"flush log {path}: {exc.strerror}") from None
    head = _read_exact(f, flushlog_header.size)
    magic, version, page_size, image_size = flushlog_header.unpack(head) if head else (b"", 0, 0, 0)
    if head is None or magic != FLUSHLOG_MAGIC or version != FLUSHLOG_VERSION or page_size <= 0:
        f.close()
        why = "too short for a header" if head is None else f"not a minivmm flush log (version {FLUSHLOG_VERSION})"
        raise UserError(f"flush log {path}: {why}")
    return f, page_size, image_size


def read_log(path: str, keep_pages: bool = True) -> FlushLog:
    """Parse a flush log; a bad header is a `UserError`, a bad or partial record ends the list.
    Without `keep_pages` every record is checked but its pages are dropped (memory stays small)."""
    f, page_size, image_size = _open_log(path)
    with f:
        log = FlushLog(page_size, image_size, [])
        for record, problem in _records(f, page_size):
            if problem is not None:
                last = log.records[-1].epoch if log.records else 0
                log.warning = f"flush log {path}: {problem}; replaying up to epoch {last}"
                break
            assert record is not None
            log.records.append(record if keep_pages else FlushRecord(record.epoch, record.offsets, []))
        return log


def _records(f: BinaryIO, page_size: int) -> Iterator[tuple[FlushRecord | None, str | None]]:
    """Each whole record, or (None, why) for the first one that is partial or corrupt."""
    while True:
        at = f.tell()
        head = f.read(flushlog_record.size)
        if not head:
            return
        if len(head) < flushlog_record.size:
            yield None, f"truncated record header at offset {at}"
            return
        magic, npages, epoch, crc, _reserved = flushlog_record.unpack(head)
        if magic != RECORD_MAGIC:
            yield None, f"bad record magic at offset {at}"
            return
        left = os.fstat(f.fileno()).st_size - f.tell()
        if npages * (8 + page_size) > left:  # never trust a count to size a read
            yield None, f"truncated record (epoch {epoch}) at offset {at}"
            return
        body = _read_exact(f, npages * (8 + page_size))
        if body is None:
            yield None, f"truncated record (epoch {epoch}) at offset {at}"
            return
        if zlib.crc32(body, zlib.crc32(flushlog_record.pack(magic, npages, epoch, 0, 0))) != crc:
            yield None, f"checksum mismatch in record (epoch {epoch}) at offset {at}"
            return
        offsets = list(struct.unpack_from(f"<{npages}Q", body))
        base = 8 * npages
        pages = [body[base + i * page_size : base + (i + 1) * page_size] for i in range(npages)]
        yield FlushRecord(epoch, offsets, pages), None


def apply_record(fd: int, record: FlushRecord) -> None:
    """Write one record's pages into the image open at `fd`."""
    for offset, page in zip(record.offsets, record.pages):
        os.pwrite(fd, page, offset)


def replay(log_path: str, image_path: str, upto: int | None, warn: Callable[[str], None]) -> int:
    """Write into `image_path` (a copy of the starting image) every record with epoch <= upto
    (all when None); returns the last epoch applied. A warning (partial/corrupt log) goes to `warn`."""
    log = read_log(log_path, keep_pages=False)  # first pass: how far the log is whole
    last = log.records[-1].epoch if log.records else 0
    if upto is not None and upto > last:
        raise UserError(f"flush log {log_path}: --upto {upto}, but its last whole record is epoch {last}")
    if log.warning:
        warn(log.warning)
    try:
        fd = os.open(image_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"image {image_path}: {exc.strerror}") from None
    try:
        if os.fstat(fd).st_size != log.image_size:
            raise UserError(f"image {image_path}: {os.fstat(fd).st_size} bytes, the log's image had {log.image_size}")
        applied = 0
        f, page_size, _ = _open_log(log_path)
        with f:  # second pass: one record in memory at a time
            for record, _problem in _records(f, page_size):
                if record is None or record.epoch > min(last, upto if upto is not None else last):
                    break
                apply_record(fd, record)
                applied = record.epoch
        os.fsync(fd)
        return applied
    finally:
        os.close(fd)


def list_epochs(log_path: str, warn: Callable[[str], None]) -> list[tuple[int, int]]:
    """(epoch, page count) of every whole record."""
    log = read_log(log_path, keep_pages=False)
    if log.warning:
        warn(log.warning)
    return [(r.epoch, len(r.offsets)) for r in log.records]
