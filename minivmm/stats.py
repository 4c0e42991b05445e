"""Run statistics as data: what `Machine.statistics()` returns, `--stats` prints and `--stats-json` writes.

The live counters are `VcpuStats` (one per vCPU, updated by its exit loop) and `PmemStats`
(one per virtio-pmem device, updated by its flusher thread). `MachineStats` is a snapshot of
the whole machine built from them. `MachineStats.to_dict()` is the JSON document, with
stable keys whose names carry their unit (`_s` seconds, `_ms` milliseconds; counts have
none); `MachineStats.from_dict()` reads it back, so a program (the benchmark, the boot tests)
gets the same structure the VMM had. `render_text()` is the human report of `--stats`.

JSON layout (`STATS_FORMAT`): {"format", "stop": {"status", "reason"} | null, "startup_s",
"wall_time_s", "vcpus": [{"index", "exits", "exits_by_kind", "exits_by_device",
"time_in_run_s", "time_outside_s", "first_run_s", "exit_log"}], "emulation_fallbacks",
"unclaimed": {bus: {op: count}}, "pmem": [{"id", "path", counters, times}],
"profile": `profiler.ProfileStats.to_dict()` | null (without --profile)}.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .profiler import ProfileStats

STATS_FORMAT = "minivmm-stats/1"  # changes when a key changes meaning or goes away

_MS = 1e3  # seconds -> milliseconds


@dataclass(frozen=True)
class ExitRecord:
    """One exit to userspace, kept raw (formatting every exit would slow the hot path).

    `kind` is the KVM exit name ("io", "mmio", "emulation-fallback"), `op` the access
    ("in"/"out", "read"/"write"), `addr` the port or guest-physical address and `device` the
    name of the bus range that took it ("unclaimed" if none). `str()` is the `--trace` line."""

    kind: str
    op: str
    addr: int
    size: int
    value: int
    device: str
    # What the access meant, in the device's words ("THR write 'h'"), and for an MMIO exit the
    # instruction that made it; filled only in a traced run (not part of an exit's identity).
    meaning: str = field(default="", compare=False)

    def __str__(self) -> str:
        where = f"port={self.addr:#06x}" if self.kind == "io" else f"addr={self.addr:#x}"
        text = f"{self.kind} {self.op} {where} size={self.size} value={self.value:#x} -> {self.device}"
        return f"{text}: {self.meaning}" if self.meaning else text


@dataclass
class VcpuStats:
    """One vCPU's exits and where its time went; times in seconds.

    `first_run` is the CLOCK_MONOTONIC time of the first KVM_RUN. `exit_log` holds every
    exit in order when the run is traced (`--trace`), else None."""

    by_kind: Counter[str] = field(default_factory=Counter)
    by_device: Counter[str] = field(default_factory=Counter)
    time_in_run: float = 0.0
    time_outside: float = 0.0
    first_run: float | None = None
    exit_log: list[ExitRecord] | None = None

    @property
    def exits(self) -> int:
        return sum(self.by_kind.values())

    def copy(self) -> VcpuStats:
        log = None if self.exit_log is None else list(self.exit_log)
        return VcpuStats(Counter(self.by_kind), Counter(self.by_device), self.time_in_run, self.time_outside, self.first_run, log)


@dataclass
class PmemStats:
    """One virtio-pmem device's counters (virtio 1.2 §5.19.6 flush requests); times in seconds."""

    flush_requests: int = 0  # VIRTIO_PMEM_REQ_TYPE_FLUSH requests completed
    bad_requests: int = 0  # unknown request types (answered with an error)
    malformed: int = 0  # malformed chains / queue errors (each sets DEVICE_NEEDS_RESET)
    batches: int = 0  # wake-ups that completed at least one request
    host_fsyncs: int = 0  # fdatasync calls made
    fsync_errors: int = 0  # fdatasync calls that raised OSError
    service_time_total: float = 0.0  # ioeventfd wake-up -> used ring updated and irqfd signalled
    service_time_max: float = 0.0
    fsync_time_total: float = 0.0
    fsync_time_max: float = 0.0
    # Non-zero once the device's flushes fail for good (virtio-pmem "sticky flush failure"):
    # the errno of the host flush that failed; every later FLUSH is answered with an error.
    flush_failed_errno: int = 0

    @property
    def service_time_mean(self) -> float:
        return self.service_time_total / self.batches if self.batches else 0.0

    @property
    def fsync_time_mean(self) -> float:
        return self.fsync_time_total / self.host_fsyncs if self.host_fsyncs else 0.0

    @property
    def overhead_time_mean(self) -> float:
        """What the VMM itself adds per batch: service time without the fdatasync (one per batch)."""
        return (self.service_time_total - self.fsync_time_total) / self.batches if self.batches else 0.0


@dataclass
class PmemDeviceStats:
    """A virtio-pmem device's counters with the `--pmem` id and backing file they belong to."""

    id: str
    path: str
    counters: PmemStats

    def to_dict(self) -> dict[str, Any]:
        c = self.counters
        return {
            "id": self.id,
            "path": self.path,
            "flush_requests": c.flush_requests,
            "bad_requests": c.bad_requests,
            "malformed": c.malformed,
            "batches": c.batches,
            "host_fsyncs": c.host_fsyncs,
            "fsync_errors": c.fsync_errors,
            "flush_failed_errno": c.flush_failed_errno,
            "service_time_total_s": c.service_time_total,
            "service_time_max_s": c.service_time_max,
            "fsync_time_total_s": c.fsync_time_total,
            "fsync_time_max_s": c.fsync_time_max,
            # derived, for readers: the means, and the figures --stats prints, in ms
            "service_time_mean_ms": c.service_time_mean * _MS,
            "service_time_max_ms": c.service_time_max * _MS,
            "fsync_time_mean_ms": c.fsync_time_mean * _MS,
            "time_without_fsync_mean_ms": c.overhead_time_mean * _MS,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PmemDeviceStats:
        counts = {f.name: d[f.name] for f in fields(PmemStats) if type(f.default) is int}
        times = {f.name: d[f"{f.name}_s"] for f in fields(PmemStats) if type(f.default) is float}
        return cls(d["id"], d["path"], PmemStats(**counts, **times))

    def render_text(self) -> str:
        c = self.counters
        return (
            f"pmem {self.id} ({self.path}): {c.flush_requests} flush requests, {c.host_fsyncs} host fsyncs, "
            f"service mean {c.service_time_mean * _MS:.3f} ms max {c.service_time_max * _MS:.3f} ms, "
            f"fsync mean {c.fsync_time_mean * _MS:.3f} ms, "
            f"without fsync mean {c.overhead_time_mean * _MS:.3f} ms"
            + (f", FLUSHES FAILING since errno {c.flush_failed_errno}" if c.flush_failed_errno else "")
        )


@dataclass
class MachineStats:
    """A snapshot of a machine's statistics (`Machine.statistics()`); times in seconds.

    `vcpus[i]` is vCPU i. `process_start` is the CLOCK_MONOTONIC time the VMM process started,
    the origin of the vCPUs' `first_run` (a snapshot read back from JSON has origin 0).
    `unclaimed` counts accesses no device claimed, per bus ("pio", "mmio") and op
    ("read", "write"). `stop_status`/`stop_reason` say how the run ended (None: still running)."""

    vcpus: list[VcpuStats]
    wall_time: float  # machine creation -> snapshot
    process_start: float
    fallbacks: dict[str, int] = field(default_factory=dict)  # emulation fallback name -> uses
    unclaimed: dict[str, dict[str, int]] = field(default_factory=dict)
    pmem: list[PmemDeviceStats] = field(default_factory=list)
    stop_status: int | None = None
    stop_reason: str | None = None
    thread_errors: list[str] = field(default_factory=list)  # "where: Type: message" of VMM-thread failures
    profile: ProfileStats | None = None  # the guest profiler's samples (--profile)

    @property
    def startup(self) -> float | None:
        """Seconds from the process start to the first KVM_RUN of any vCPU (None: never ran)."""
        first = min((v.first_run for v in self.vcpus if v.first_run is not None), default=None)
        return None if first is None else first - self.process_start

    def exits_by_kind(self) -> Counter[str]:
        """Exits by kind, summed over the vCPUs."""
        return sum((v.by_kind for v in self.vcpus), Counter())

    def exits_by_device(self) -> Counter[str]:
        """Accesses by device, summed over the vCPUs."""
        return sum((v.by_device for v in self.vcpus), Counter())

    def pmem_device(self, ident: str) -> PmemDeviceStats | None:
        return next((p for p in self.pmem if p.id == ident), None)

    # -- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON document (plain dicts, lists, numbers and strings); counters most common first."""
        stop = None if self.stop_status is None else {"status": self.stop_status, "reason": self.stop_reason}
        return {
            "format": STATS_FORMAT,
            "stop": stop,
            "startup_s": self.startup,
            "wall_time_s": self.wall_time,
            "vcpus": [self._vcpu_dict(i, v) for i, v in enumerate(self.vcpus)],
            "emulation_fallbacks": dict(self.fallbacks),
            "unclaimed": {bus: dict(ops) for bus, ops in self.unclaimed.items()},
            "pmem": [p.to_dict() for p in self.pmem],
            "thread_errors": list(self.thread_errors),
            "profile": None if self.profile is None else self.profile.to_dict(),
        }

    def _vcpu_dict(self, index: int, v: VcpuStats) -> dict[str, Any]:
        return {
            "index": index,
            "exits": v.exits,
            "exits_by_kind": dict(v.by_kind.most_common()),
            "exits_by_device": dict(v.by_device.most_common()),
            "time_in_run_s": v.time_in_run,
            "time_outside_s": v.time_outside,
            "first_run_s": None if v.first_run is None else v.first_run - self.process_start,  # after process start
            "exit_log": None if v.exit_log is None else [asdict(r) for r in v.exit_log],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MachineStats:
        """The inverse of `to_dict` (with `process_start` 0: first-run times are after the process start)."""
        if d.get("format") != STATS_FORMAT:
            raise ValueError(f"not a {STATS_FORMAT} document (format {d.get('format')!r})")
        vcpus = []
        for i, v in enumerate(d["vcpus"]):
            if v["index"] != i:
                raise ValueError(f"vcpus[{i}] has index {v['index']}")
            log = None if v["exit_log"] is None else [ExitRecord(**r) for r in v["exit_log"]]
            vcpus.append(
                VcpuStats(Counter(v["exits_by_kind"]), Counter(v["exits_by_device"]), v["time_in_run_s"], v["time_outside_s"], v["first_run_s"], log)
            )
        stop = d["stop"]
        return cls(
            vcpus=vcpus,
            wall_time=d["wall_time_s"],
            process_start=0.0,
            fallbacks=dict(d["emulation_fallbacks"]),
            unclaimed={bus: dict(ops) for bus, ops in d["unclaimed"].items()},
            pmem=[PmemDeviceStats.from_dict(p) for p in d["pmem"]],
            stop_status=None if stop is None else stop["status"],
            stop_reason=None if stop is None else stop["reason"],
            thread_errors=list(d.get("thread_errors", [])),
            profile=None if d.get("profile") is None else ProfileStats.from_dict(d["profile"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> MachineStats:
        return cls.from_dict(json.loads(text))

    # -- text -----------------------------------------------------------------------------
    def render_text(self) -> str:
        """The `--stats` report (the stop reason is not part of it: the CLI prints it last)."""
        lines = []
        if (startup := self.startup) is not None:
            lines.append(f"startup: first KVM_RUN {startup:.3f} s after process start")
        for i, v in enumerate(self.vcpus):
            lines.append(
                f"vcpu{i}: {v.exits} exits; in KVM_RUN {v.time_in_run:.3f} s, outside {v.time_outside:.3f} s, wall {self.wall_time:.3f} s"
            )
            lines += [f"  exits {kind}: {n}" for kind, n in v.by_kind.most_common()]
            lines += [f"  device {name}: {n}" for name, n in v.by_device.most_common()]
        lines += [f"emulation fallback {name}: {n}" for name, n in self.fallbacks.items()]
        lines += [p.render_text() for p in self.pmem]
        for bus, ops in self.unclaimed.items():
            lines += [f"{bus} unclaimed {op}s: {n}" for op, n in ops.items()]
        lines += [f"thread error: {e}" for e in self.thread_errors]
        return "\n".join(lines)
