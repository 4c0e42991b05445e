"""``--pmem`` backing files: option parsing, validation, creation and mapping.

``--pmem PATH[,size=SIZE][,id=ID][,discard-writes=on|off][,prealloc=on|off]`` names a host file that becomes a
virtio-pmem device (virtio 1.2 section 5.19): the guest maps its bytes directly, and a guest
flush request becomes ``fdatasync`` of the file.

Rules (every violation is a one-line `UserError`, and leaves every named file untouched):

* a missing file is created sparse at ``size`` (``size`` is then required);
* ``size`` may be omitted for an existing file: its length is used;
* the size is a positive multiple of 2 MiB (`layout.PMD_SIZE`), refused otherwise, never
  rounded: the guest's pmem driver maps a device in 2 MiB units (a ragged end fails its
  memory-hotplug span check) and ext4 DAX maps 2 MiB pieces with one PMD each (README "DAX
  with 2 MiB pages"); rounding would change the file's length behind the user's back;
* an existing file is never shrunk or truncated: a file longer than ``size`` is an error, a
  shorter one is extended sparsely only when ``size`` is given (not with discard-writes=on);
* the path must be a regular file (or missing, in an existing directory) openable read/write;
* two ``--pmem`` options may not name the same file (same st_dev/st_ino) or the same id;
* a file in use by another minivmm (``flock``) is refused;
* ``prealloc=on`` allocates every block of the file up front (``posix_fallocate``), so a full
  disk is a start-up error instead of a guest write the host cannot back later.

`check_plan` runs every check that needs no file (``--mem``, the device count against the PCI
slots, the guest-physical map, the guest RAM the page structures take) before `open_all`
touches any. `open_all` validates every spec before it creates or extends anything, and undoes what it
did (removes created files, truncates extended ones back to their old length and restores
their times) if a later step fails.

``discard-writes=on`` opens the file read-only and maps it MAP_PRIVATE with write permission:
the guest may write, its writes land in private copy-on-write pages and never reach the file;
a flush then succeeds without syncing anything.

``lose-unflushed=on`` (power-failure simulation, `minivmm.powerfail`) opens the file read/write
but maps it MAP_PRIVATE too: the guest's writes reach the file only when it flushes, and a
flush copies the pages it dirtied (KVM's dirty log) into the file. ``flush-log=FILE`` (only
with lose-unflushed=on) records every flush (`minivmm.flushlog`).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import stat
from dataclasses import dataclass, field

from . import layout
from .errors import UserError
from .units import format_size, parse_size

PMEM_SIZE_ALIGN = layout.PMD_SIZE  # device sizes: whole 2 MiB pages (see the rules above)
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_BOOL = {"on": True, "off": False}


@dataclass(frozen=True)
class PmemSpec:
    """One parsed ``--pmem`` option."""

    path: str
    size: int | None = None
    id: str | None = None
    discard_writes: bool = False
    readonly: bool = False  # a read-only mapping and KVM memory slot: guest writes go nowhere
    memdev: str | None = None  # the memory-backend object's id (--object / object-add); None: same as id
    plug: bool = True  # False: an --object no --device uses (opened, not plugged)
    prealloc: bool = False
    lose_unflushed: bool = False  # MAP_PRIVATE; only flushed pages reach the file (powerfail)
    flush_log: str | None = None  # with lose_unflushed: append a record per flush to this file

    @property
    def file_option(self) -> str | None:
        """The option that opens the file read-only (the file is then never created or
        extended): "discard-writes=on" or "readonly=on", else None."""
        return "readonly=on" if self.readonly else "discard-writes=on" if self.discard_writes else None


@dataclass
class PmemBacking:
    """An opened, validated and mapped backing file. `close()` unmaps and closes it."""

    fd: int
    path: str
    size: int
    mapping: mmap.mmap = field(repr=False)
    discard_writes: bool
    id: str
    created: bool = False  # the file did not exist before this run
    readonly: bool = False  # mapped PROT_READ, given to KVM as a read-only slot
    extended_from: os.stat_result | None = field(default=None, repr=False)  # stat before this run extended it
    lose_unflushed: bool = False  # mapped MAP_PRIVATE from a read/write fd: flushes copy dirty pages
    flush_log: str | None = None

    def rollback(self) -> None:
        """Undo what opening did to the file, after `close()`: remove a file this run created,
        or cut an extended one back to its old length and times (a refused run leaves no trace)."""
        _undo_by_path(self.path, self.created, self.extended_from)

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.mapping.close()
        except BufferError:
            pass  # still exported as guest memory; unmapped when the last view goes away
        os.close(self.fd)
        self.fd = -1


def parse_pmem_option(text: str) -> PmemSpec:
    """Parse ``PATH[,size=SIZE][,id=ID][,discard-writes=on|off][,prealloc=on|off][,lose-unflushed=on|off]
    [,flush-log=FILE]`` (a path cannot hold a comma)."""
    path, *options = text.split(",")
    if not path:
        raise UserError(f"--pmem {text!r}: empty path")
    size: int | None = None
    ident: str | None = None
    discard = prealloc = lose = False
    flush_log: str | None = None
    seen: set[str] = set()
    for opt in options:
        key, eq, value = opt.partition("=")
        if not eq or not value:
            raise UserError(f"--pmem {text!r}: expected key=value, got {opt!r}")
        if key in seen:
            raise UserError(f"--pmem {text!r}: {key} given twice")
        seen.add(key)
        if key == "size":
            size = parse_size(value)
            _check_size(size, f"--pmem {path}: size={value}")
        elif key == "id":
            if not _ID_RE.fullmatch(value):
                raise UserError(f"--pmem {text!r}: bad id {value!r} (letters, digits, '_', '.', '-')")
            ident = value
        elif key in ("discard-writes", "prealloc", "lose-unflushed"):
            if value not in _BOOL:
                raise UserError(f"--pmem {text!r}: {key} must be on or off, not {value!r}")
            if key == "discard-writes":
                discard = _BOOL[value]
            elif key == "prealloc":
                prealloc = _BOOL[value]
            else:
                lose = _BOOL[value]
        elif key == "flush-log":
            flush_log = value
        else:
            raise UserError(
                f"--pmem {text!r}: unknown option {key!r} (known: size, id, discard-writes, prealloc, lose-unflushed, flush-log)"
            )
    if discard and prealloc:
        raise UserError(f"--pmem {text!r}: prealloc=on with discard-writes=on (the file is never written)")
    spec = PmemSpec(path, size, ident, discard, prealloc=prealloc, lose_unflushed=lose, flush_log=flush_log)
    check_powerfail_options(spec, f"--pmem {text!r}")
    return spec


def check_powerfail_options(spec: PmemSpec, what: str) -> None:
    """lose-unflushed needs a file the guest's flushes may write; flush-log needs lose-unflushed."""
    if spec.lose_unflushed and spec.file_option:
        raise UserError(f"{what}: lose-unflushed=on cannot be combined with {spec.file_option}")
    if spec.flush_log is not None and not spec.lose_unflushed:
        raise UserError(f"{what}: flush-log= needs lose-unflushed=on")


def valid_id(ident: str) -> bool:
    """Whether `ident` may name a device or a memory backend."""
    return _ID_RE.fullmatch(ident) is not None


def _check_size(size: int, what: str) -> None:
    if size <= 0 or size % PMEM_SIZE_ALIGN:
        raise UserError(f"{what}: size {format_size(size)} is not a positive multiple of 2M")


def check_plan(specs: list[PmemSpec], mem_size: int) -> list[str]:
    """Every check of the whole run's layout that needs no file created, extended or locked:
    ``--mem``, the ids, the device count against PCI bus 0's slots, every size, the
    guest-physical map and the guest RAM for page structures (`layout.check_pmem_layout`).
    Call it before `open_all`; returns one-line warnings, raises `UserError`."""
    from .pci.host import PCI_SLOTS  # slot 0 holds the host bridge

    layout.check_mem_size(mem_size)
    ids = _assign_ids(specs)
    if len(specs) > PCI_SLOTS - 1:  # the same words as the PCI host's own refusal
        raise UserError(f"{ids[PCI_SLOTS - 1]}: PCI bus 0 is full (at most {PCI_SLOTS - 1} devices)")
    for spec in specs:
        if spec.size is not None:
            _check_size(spec.size, f"--pmem {spec.path}")
    return layout.check_pmem_layout(mem_size, planned_sizes(specs))


def planned_sizes(specs: list[PmemSpec]) -> list[int]:
    """The sizes (bytes) the devices of `specs` will have, where known before any file is
    opened (`_planned_size`); the unknown ones are left out."""
    return [size for size in map(_planned_size, specs) if size is not None]


def _planned_size(spec: PmemSpec) -> int | None:
    """The size the device will have, if known without opening the file (an existing file's
    length when size= is not given); None leaves the verdict to `open_all`."""
    if spec.size is not None:
        return spec.size
    try:
        st = os.stat(spec.path)
    except OSError:
        return None
    usable = stat.S_ISREG(st.st_mode) and st.st_size > 0 and st.st_size % PMEM_SIZE_ALIGN == 0
    return st.st_size if usable else None


@dataclass
class _Plan:
    """What open_all will do for one spec, decided before any side effect."""

    spec: PmemSpec
    ident: str
    size: int
    fd: int = -1  # opened existing file
    old_stat: os.stat_result | None = None  # None: the file will be created
    created: bool = False
    extended: bool = False


def open_backing(spec: PmemSpec) -> PmemBacking:
    """Open, validate, create or extend, and map one backing file (see module docstring)."""
    return open_all([spec])[0]


def open_all(specs: list[PmemSpec]) -> list[PmemBacking]:
    """Open every spec, or none: on any error nothing is left created, extended or open."""
    plans: list[_Plan] = []
    done: list[PmemBacking] = []
    try:
        ids = _assign_ids(specs)
        seen: dict[object, str] = {}
        for spec, ident in zip(specs, ids):
            plan = _inspect(spec, ident)
            plans.append(plan)
            if plan.old_stat is not None:
                key: object = (plan.old_stat.st_dev, plan.old_stat.st_ino)
            else:
                key = os.path.realpath(spec.path)
            if key in seen:
                raise UserError(f"--pmem {spec.path}: same file as --pmem {seen[key]}")
            seen[key] = spec.path
        for plan in plans:
            _lock(plan)
        for plan in plans:  # side effects start here
            _create_or_extend(plan)
        for plan in plans:
            done.append(_map(plan))
        return done
    except BaseException:
        for backing in done:
            backing.mapping.close()
        for plan in reversed(plans):
            _undo(plan)
        raise


def _assign_ids(specs: list[PmemSpec]) -> list[str]:
    given = [s.id for s in specs if s.id is not None]
    dup = {i for i in given if given.count(i) > 1}
    if dup:
        raise UserError(f"--pmem: id {min(dup)!r} given to more than one device")
    ids, n = [], 0
    for spec in specs:
        if spec.id is not None:
            ids.append(spec.id)
            continue
        while f"pmem{n}" in given:
            n += 1
        ids.append(f"pmem{n}")
        n += 1
    return ids


def _inspect(spec: PmemSpec, ident: str) -> _Plan:
    """Validate one spec; opens an existing file but changes nothing on disk."""
    path = spec.path
    if not path:
        raise UserError("--pmem: empty path")
    if spec.size is not None:
        _check_size(spec.size, f"--pmem {path}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _inspect_missing(spec, ident)
    except OSError as exc:
        raise UserError(f"--pmem {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"--pmem {path}: is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"--pmem {path}: not a regular file")
    flags = (os.O_RDONLY if spec.file_option else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        mode = "read" if spec.file_option else "read/write"
        raise UserError(f"--pmem {path}: cannot open {mode}: {exc.strerror}") from None
    plan = _Plan(spec, ident, 0, fd)
    try:
        return _check_existing(plan)
    except BaseException:
        os.close(fd)
        raise


def _check_existing(plan: _Plan) -> _Plan:
    spec, path = plan.spec, plan.spec.path
    st = os.fstat(plan.fd)
    plan.old_stat = st
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"--pmem {path}: not a regular file")
    if spec.size is None:
        if st.st_size == 0:
            raise UserError(f"--pmem {path}: file is empty; give size=")
        _check_size(st.st_size, f"--pmem {path}: file length")
        plan.size = st.st_size
    elif st.st_size > spec.size:
        raise UserError(
            f"--pmem {path}: file is {format_size(st.st_size)}, longer than size={format_size(spec.size)}; refusing to shrink"
        )
    elif st.st_size < spec.size and spec.file_option:
        raise UserError(
            f"--pmem {path}: file is {format_size(st.st_size)}, shorter than size={format_size(spec.size)}, "
            f"and {spec.file_option} never extends it"
        )
    else:
        plan.size = spec.size
    return plan


def _lock(plan: _Plan) -> None:
    """Refuse a file another minivmm uses: exclusive lock, shared with discard-writes=on."""
    if plan.fd < 0:
        return
    try:
        fcntl.flock(plan.fd, (fcntl.LOCK_SH if plan.spec.file_option else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise UserError(f"--pmem {plan.spec.path}: in use by another process") from None
        raise UserError(f"--pmem {plan.spec.path}: cannot lock: {exc.strerror}") from None


def _inspect_missing(spec: PmemSpec, ident: str) -> _Plan:
    path = spec.path
    if spec.size is None:
        raise UserError(f"--pmem {path}: file does not exist; give size= to create it")
    if spec.file_option:
        raise UserError(f"--pmem {path}: file does not exist ({spec.file_option} never creates one)")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise UserError(f"--pmem {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--pmem {path}: cannot create a file in {parent}")
    return _Plan(spec, ident, spec.size)


def _create_or_extend(plan: _Plan) -> None:
    path = plan.spec.path
    try:
        if plan.old_stat is None:
            plan.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOCTTY, 0o600)
            plan.created = True
            fcntl.flock(plan.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(plan.fd, plan.size)  # sparse: no blocks allocated
        elif plan.old_stat.st_size < plan.size:
            plan.extended = True
            os.ftruncate(plan.fd, plan.size)
    except OSError as exc:
        raise UserError(f"--pmem {path}: cannot create or extend to {format_size(plan.size)}: {exc.strerror}") from None
    if plan.spec.prealloc:
        _preallocate(plan)


def _preallocate(plan: _Plan) -> None:
    """Allocate every block of the file (posix_fallocate never changes data, nor the length
    here: the file is already `plan.size` long), so no guest write can find the disk full."""
    free = _free_bytes(plan.spec.path)
    allocated = os.fstat(plan.fd).st_blocks * 512
    if free is not None and plan.size - allocated > free:  # never fill the host's disk to find out
        raise UserError(
            f"--pmem {plan.spec.path}: prealloc=on cannot allocate {format_size(plan.size)} "
            f"({format_size(free)} free on its filesystem): {os.strerror(errno.ENOSPC)}"
        )
    try:
        os.posix_fallocate(plan.fd, 0, plan.size)
    except OSError as exc:
        free = _free_bytes(plan.spec.path)
        where = f" ({format_size(free)} free on its filesystem)" if free is not None else ""
        raise UserError(f"--pmem {plan.spec.path}: prealloc=on cannot allocate {format_size(plan.size)}{where}: {exc.strerror}") from None


def _map(plan: _Plan) -> PmemBacking:
    spec = plan.spec
    path, discard = spec.path, spec.discard_writes
    try:
        mapping = mmap.mmap(
            plan.fd,
            plan.size,
            mmap.MAP_PRIVATE if discard or spec.lose_unflushed else mmap.MAP_SHARED,
            mmap.PROT_READ if spec.readonly else mmap.PROT_READ | mmap.PROT_WRITE,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"--pmem {path}: cannot map {format_size(plan.size)}: {exc}") from None
    extended_from = plan.old_stat if plan.extended else None
    return PmemBacking(
        plan.fd, path, plan.size, mapping, discard, plan.ident, plan.created, spec.readonly, extended_from,
        spec.lose_unflushed, spec.flush_log,
    )  # fmt: skip


def _undo(plan: _Plan) -> None:
    """Best-effort rollback of `_create_or_extend`, then close the fd."""
    if plan.fd >= 0:
        os.close(plan.fd)
        plan.fd = -1
    _undo_by_path(plan.spec.path, plan.created, plan.old_stat if plan.extended else None)


def _undo_by_path(path: str, created: bool, extended_from: os.stat_result | None) -> None:
    """Remove a created file, or truncate an extended one back (best effort: a rollback)."""
    try:
        if created:
            os.unlink(path)
        elif extended_from is not None:
            os.truncate(path, extended_from.st_size)
            os.utime(path, ns=(extended_from.st_atime_ns, extended_from.st_mtime_ns))
    except OSError:
        pass


# -- host space for sparse files ------------------------------------------------------------------
def _free_bytes(path: str) -> int | None:
    """Bytes an unprivileged writer may still allocate on `path`'s filesystem (statvfs)."""
    try:
        vfs = os.statvfs(path)
    except OSError:
        return None
    return vfs.f_bavail * vfs.f_frsize


def sparse_warnings(backings: list[PmemBacking]) -> list[str]:
    """One line per writable backing file whose unallocated part exceeds the free space of its
    filesystem: guest writes to its holes may find the disk full (see `unbacked_cause`)."""
    warnings = []
    for backing in backings:
        if backing.discard_writes:
            continue
        st = os.fstat(backing.fd)
        holes = max(0, backing.size - st.st_blocks * 512)
        free = _free_bytes(backing.path)
        if free is not None and holes > free:
            warnings.append(
                f"--pmem {backing.path}: {format_size(holes)} of the file is not allocated but its filesystem has only "
                f"{format_size(free)} free; guest writes may fail (prealloc=on allocates it up front)"
            )
    return warnings


def unbacked_cause(path: str, offset: int, length: int) -> str:
    """The likely reason the host could not back bytes [offset, offset+length) of a mapped
    backing file (a guest access that KVM could not map)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"the file cannot be examined ({exc.strerror}); was it removed?"
    if st.st_size < offset + length:
        return f"the file was truncated by someone (it is {format_size(st.st_size)} long now)"
    free = _free_bytes(path)
    if free is not None and free < PMEM_SIZE_ALIGN:
        return f"its filesystem is full ({format_size(free)} free) and the file is sparse; prealloc=on allocates it up front"
    return "the host could not allocate the page (filesystem quota, or host memory)"
