"""`--timeline FILE`: a picture of a run against wall time, as a plain SVG document.

What is recorded, and what it costs when `--timeline` is off:

* per vCPU, `IntervalSampler` snapshots the cumulative counters of `stats.VcpuStats` (exits by
  kind and by device, time inside and outside KVM_RUN) and the emulation fallback counts once
  an exit crosses the next interval boundary (`INTERVAL` = 100 ms). The vCPU loop compares one
  float per exit; off, the boundary is +inf. The per-interval values are differences of
  consecutive snapshots, so no per-exit object is ever made.
* `MilestoneScanner` watches the serial console output for the guest's milestones (the first
  line, init started, devices probed); the console calls it only when a timeline is on.
* a virtio-pmem device keeps a `FlushRecord` per served batch only when a timeline is on
  (`VirtioPmem.flush_times`).

`render_svg(data)` draws stacked panels sharing one time axis (seconds after the first
KVM_RUN): exits per interval by kind, by device, the share of each interval spent inside and
outside KVM_RUN, emulation fallbacks, pmem flush service times, with the console milestones as
vertical lines through every panel. No plotting library is needed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

from .stats import VcpuStats

if TYPE_CHECKING:
    from .machine import Machine

INTERVAL = 0.1  # seconds per sampling interval


@dataclass(frozen=True)
class Sample:
    """Cumulative counters of one vCPU at CLOCK_MONOTONIC time `t` (seconds)."""

    t: float
    by_kind: dict[str, int]
    by_device: dict[str, int]
    time_in_run: float
    time_outside: float
    fallbacks: dict[str, int]


class IntervalSampler:
    """Snapshots a vCPU's counters at most once per `interval`; called from the vCPU thread only.

    `due` is the `perf_counter` time of the next snapshot: the loop calls `sample(now)` when an
    exit's time reaches it (a KVM_RUN that lasts several intervals gives one snapshot at its end)."""

    def __init__(self, stats: VcpuStats, fallback_counts: dict[str, int], interval: float = INTERVAL) -> None:
        self.stats = stats
        self.fallback_counts = fallback_counts
        self.interval = interval
        self.samples: list[Sample] = []
        self.due = 0.0  # the first exit takes the first snapshot

    def sample(self, now: float) -> float:
        """Take a snapshot; returns the `perf_counter` time the next one is due."""
        s = self.stats
        self.samples.append(
            Sample(time.monotonic(), dict(s.by_kind), dict(s.by_device), s.time_in_run, s.time_outside, dict(self.fallback_counts))
        )
        self.due = now + self.interval
        return self.due


@dataclass(frozen=True)
class Milestone:
    t: float  # CLOCK_MONOTONIC seconds
    label: str
    line: str


# (label, substrings any of which marks it), in boot order; each is recorded once, first match.
MILESTONES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("init started", (" as init process", "init started")),  # the kernel's "Run /init as init process", or /init's own line
    ("pmem0 probed", ("virtio_pmem", "pmem0")),  # the driver's line, or the first use of the disk
    ("powering off", ("powering off", "reboot: Power down")),
)
FIRST_LINE = "first console line"


class MilestoneScanner:
    """Splits console output into lines and records the first line matching each milestone."""

    def __init__(self, milestones: Sequence[tuple[str, tuple[str, ...]]] = MILESTONES, clock: Callable[[], float] = time.monotonic) -> None:
        self.pending = list(milestones)
        self.clock = clock
        self.found: list[Milestone] = []
        self._line = bytearray()

    def feed(self, data: bytes) -> None:
        for byte in data:
            if byte == 0x0A:
                self._end_line(self._line.decode("utf-8", "replace").strip())
                self._line.clear()
            elif len(self._line) < 512:  # a line without end cannot grow without bound
                self._line.append(byte)

    def _end_line(self, text: str) -> None:
        if not text:
            return
        now = self.clock()
        if not self.found:
            self.found.append(Milestone(now, FIRST_LINE, text))
        for entry in list(self.pending):
            if any(s in text for s in entry[1]):
                self.found.append(Milestone(now, entry[0], text))
                self.pending.remove(entry)


@dataclass(frozen=True)
class FlushRecord:
    """One served batch of virtio-pmem requests: the ioeventfd wake-up and the completion
    (CLOCK_MONOTONIC seconds), and how many FLUSH requests it held."""

    woke: float
    done: float
    requests: int

    @property
    def service_time(self) -> float:
        return self.done - self.woke


@dataclass
class TimelineData:
    """Everything `render_svg` draws; times are CLOCK_MONOTONIC seconds."""

    start: float  # time zero of the picture (the first KVM_RUN)
    end: float
    vcpus: list[list[Sample]]
    milestones: list[Milestone] = field(default_factory=list)
    flushes: dict[str, list[FlushRecord]] = field(default_factory=dict)  # pmem id -> batches


# -- per-interval series -----------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    t0: float  # seconds after `TimelineData.start`
    t1: float
    by_kind: dict[str, int]
    by_device: dict[str, int]
    time_in_run: float
    time_outside: float
    fallbacks: int


def _diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: v - a.get(k, 0) for k, v in b.items() if v - a.get(k, 0)}


def intervals(samples: Sequence[Sample], start: float) -> list[Interval]:
    """The differences of consecutive snapshots: what happened in each interval."""
    out = []
    for a, b in zip(samples, samples[1:]):
        out.append(
            Interval(
                a.t - start, b.t - start, _diff(a.by_kind, b.by_kind), _diff(a.by_device, b.by_device),
                b.time_in_run - a.time_in_run, b.time_outside - a.time_outside,
                sum(b.fallbacks.values()) - sum(a.fallbacks.values()),
            )
        )
    return out


# -- SVG ----------------------------------------------------------------------------------------
WIDTH = 1100
LEFT, RIGHT = 90, 200  # margins: axis labels left, legends right
PANEL_H, GAP, TOP = 130, 42, 126
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
MAX_SERIES = 8  # more series than this are summed into "other"


def _nice_max(value: float) -> float:
    """The smallest 1/2/5 x 10^k at or above `value` (an axis top a reader can divide)."""
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    return next(m * exp for m in (1, 2, 5, 10) if m * exp >= value)


def _fmt(v: float) -> str:
    return f"{v:g}" if v < 1e4 else f"{v / 1e3:g}k"


class _Svg:
    def __init__(self, duration: float) -> None:
        self.parts: list[str] = []
        self.duration = max(duration, INTERVAL)
        self.plot_w = WIDTH - LEFT - RIGHT

    def x(self, t: float) -> float:
        return LEFT + self.plot_w * min(max(t, 0.0), self.duration) / self.duration

    def add(self, text: str) -> None:
        self.parts.append(text)

    def text(self, x: float, y: float, s: str, *, size: int = 11, anchor: str = "start", cls: str = "", extra: str = "") -> None:
        c = f' class="{cls}"' if cls else ""
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{c}{extra}>{escape(s)}</text>')

    def panel(self, top: float, title: str, ymax: float, unit: str) -> Callable[[float], float]:
        """Frame, title, y ticks; returns the value -> y mapping of the panel."""
        self.add(f'<rect x="{LEFT}" y="{top}" width="{self.plot_w}" height="{PANEL_H}" fill="#fafafa" stroke="#999"/>')
        self.text(LEFT, top - 8, title, size=13, extra=' font-weight="bold"')
        for frac in (0.0, 0.5, 1.0):
            y = top + PANEL_H * (1 - frac)
            self.add(f'<line x1="{LEFT - 4}" y1="{y:.1f}" x2="{LEFT + self.plot_w}" y2="{y:.1f}" stroke="#ddd"/>')
            self.text(LEFT - 6, y + 4, _fmt(ymax * frac), anchor="end")
        self.text(14, top + PANEL_H / 2, unit, anchor="middle", extra=f' transform="rotate(-90 14 {top + PANEL_H / 2:.1f})"')
        return lambda v: top + PANEL_H * (1 - min(v, ymax) / ymax)

    def legend(self, top: float, entries: Iterable[tuple[str, str]]) -> None:
        for i, (name, colour) in enumerate(entries):
            y = top + 6 + 15 * i
            self.add(f'<rect x="{WIDTH - RIGHT + 12}" y="{y:.1f}" width="10" height="10" fill="{colour}"/>')
            self.text(WIDTH - RIGHT + 27, y + 9, name)

    def series(self, cls: str, name: str, colour: str, points: list[tuple[float, float]], y: Callable[[float], float]) -> None:
        """A step line: each interval [t0, t1) at its value."""
        path = " ".join(f"{self.x(t):.1f},{y(v):.1f}" for t, v in points)
        self.add(f'<polyline class="{cls}" data-name="{escape(name)}" fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')


def _bucket(iv: Interval, n: float) -> list[tuple[float, float]]:
    """Step points of `n` exits in an interval. Every exit counted in an interval happened in its
    first `INTERVAL` (an exit past that takes the next snapshot); a longer interval is one long
    KVM_RUN after them, drawn as zero."""
    mid = min(iv.t1, iv.t0 + INTERVAL)
    return [(iv.t0, n), (mid, n), (mid, 0), (iv.t1, 0)]


def _per_interval(ivs: Sequence[Interval], key: Callable[[Interval], dict[str, int]]) -> dict[str, list[tuple[float, float]]]:
    """Series name -> step points of (count per `INTERVAL`), the top MAX_SERIES by total."""
    totals: dict[str, int] = {}
    for iv in ivs:
        for k, v in key(iv).items():
            totals[k] = totals.get(k, 0) + v
    names = sorted(totals, key=lambda k: -totals[k])
    keep = names[:MAX_SERIES] if len(names) <= MAX_SERIES else names[: MAX_SERIES - 1]
    out: dict[str, list[tuple[float, float]]] = {}
    for name in keep + (["other"] if len(keep) < len(names) else []):
        pts: list[tuple[float, float]] = []
        for iv in ivs:
            d = key(iv)
            n = d.get(name, 0) if name != "other" else sum(v for k, v in d.items() if k not in keep)
            pts += _bucket(iv, n)
        out[name] = pts
    return out


def _label_groups(svg: _Svg, data: TimelineData) -> list[tuple[float, list[Milestone]]]:
    """Milestones in time order, those closer than 4 px on the picture grouped under one label."""
    groups: list[tuple[float, list[Milestone]]] = []
    for m in sorted(data.milestones, key=lambda m: m.t):
        x = svg.x(m.t - data.start)
        if groups and x - groups[-1][0] < 4:
            groups[-1][1].append(m)
        else:
            groups.append((x, [m]))
    return groups


def render_svg(data: TimelineData) -> str:
    """The picture as an SVG document (one panel per series group; milestones across all)."""
    ivs = [iv for samples in data.vcpus for iv in intervals(samples, data.start)]
    svg = _Svg(data.end - data.start)
    panels = 5
    height = TOP + panels * (PANEL_H + GAP) + 40
    top = TOP
    svg.text(LEFT, 24, f"minivmm run timeline: {data.end - data.start:.2f} s of wall time, {len(data.vcpus)} vCPU(s), "
             f"{int(INTERVAL * 1000)} ms intervals", size=15, extra=' font-weight="bold"')
    svg.text(LEFT, 42, "dashed lines: guest console milestones (hover for the line); x: seconds after the first KVM_RUN", size=11, extra=' fill="#555"')
    # exits by kind, exits by device
    for cls, title, key in (("exits-kind", "exits to the VMM by kind", lambda iv: iv.by_kind),
                            ("exits-device", "exits to the VMM by device", lambda iv: iv.by_device)):
        series = _per_interval(ivs, key)
        ymax = _nice_max(max((v for pts in series.values() for _, v in pts), default=0))
        y = svg.panel(top, title, ymax, f"per {int(INTERVAL * 1000)} ms")
        colours = dict(zip(series, PALETTE))
        for name, pts in series.items():
            svg.series(cls, name, colours[name], pts, y)
        svg.legend(top, colours.items())
        top += PANEL_H + GAP
    # time inside / outside KVM_RUN as a share of each interval
    y = svg.panel(top, "time inside and outside KVM_RUN", 100, "% of interval")
    for cls, name, colour, get in (("run-in", "inside KVM_RUN", PALETTE[2], lambda iv: iv.time_in_run),
                                   ("run-out", "outside (VMM)", PALETTE[3], lambda iv: iv.time_outside)):
        pts: list[tuple[float, float]] = []
        for iv in ivs:
            share = 100 * get(iv) / max(iv.t1 - iv.t0, 1e-9)
            pts += [(iv.t0, share), (iv.t1, share)]
        svg.series(cls, name, colour, pts, y)
    svg.legend(top, [("inside KVM_RUN", PALETTE[2]), ("outside (VMM)", PALETTE[3])])
    top += PANEL_H + GAP
    # emulation fallbacks
    total_fb = sum(iv.fallbacks for iv in ivs)
    y = svg.panel(top, f"emulation fallbacks ({total_fb} in all)", _nice_max(max((iv.fallbacks for iv in ivs), default=0)), f"per {int(INTERVAL * 1000)} ms")
    for iv in ivs:
        if iv.fallbacks:
            svg.add(f'<rect class="fallback" x="{svg.x(iv.t0):.1f}" y="{y(iv.fallbacks):.1f}" width="{max(svg.x(iv.t0 + INTERVAL) - svg.x(iv.t0), 1.5):.1f}" '
                    f'height="{y(0) - y(iv.fallbacks):.1f}" fill="{PALETTE[4]}"><title>{iv.fallbacks} fallbacks</title></rect>')
    top += PANEL_H + GAP
    # pmem flushes: one mark per served batch, at its wake-up, as high as its service time
    flushes = [(ident, f) for ident, recs in data.flushes.items() for f in recs]
    n_req = sum(f.requests for _, f in flushes)
    ymax = _nice_max(max((f.service_time * 1e3 for _, f in flushes), default=0))
    y = svg.panel(top, f"virtio-pmem flush batches: service time ({n_req} FLUSH requests in {len(flushes)} batches)", ymax, "ms")
    colours = {ident: PALETTE[i % len(PALETTE)] for i, ident in enumerate(data.flushes)}
    for ident, f in flushes:
        x = svg.x(f.woke - data.start)
        svg.add(f'<line class="flush" data-device="{escape(ident)}" x1="{x:.1f}" y1="{y(0):.1f}" x2="{x:.1f}" y2="{y(f.service_time * 1e3):.1f}" '
                f'stroke="{colours[ident]}" stroke-width="2"><title>{ident}: {f.requests} requests, {f.service_time * 1e3:.3f} ms</title></line>')
    svg.legend(top, colours.items())
    bottom = top + PANEL_H
    # time axis
    step = _nice_max(svg.duration / 10)
    t = 0.0
    while t <= svg.duration + 1e-9:
        svg.add(f'<line x1="{svg.x(t):.1f}" y1="{bottom}" x2="{svg.x(t):.1f}" y2="{bottom + 5}" stroke="#333"/>')
        svg.text(svg.x(t), bottom + 18, f"{t:g}", anchor="middle")
        t += step
    svg.text(LEFT + svg.plot_w / 2, bottom + 34, "seconds after the first KVM_RUN", anchor="middle")
    # milestones through every panel; labels on three rows above the panels, neighbours joined
    for row, (x, group) in enumerate(_label_groups(svg, data)):
        for m in group:
            mx = svg.x(m.t - data.start)
            svg.add(f'<line class="milestone" data-label="{escape(m.label)}" x1="{mx:.1f}" y1="{TOP - 62 + 14 * (row % 3)}" x2="{mx:.1f}" y2="{bottom}" '
                    f'stroke="#444" stroke-dasharray="4 3"><title>{escape(m.line)}</title></line>')
        label = " + ".join(m.label for m in group) + f" ({group[0].t - data.start:.1f} s)"
        anchor = "end" if x > LEFT + svg.plot_w * 0.6 else "start"
        svg.text(x + (-3 if anchor == "end" else 3), TOP - 64 + 14 * (row % 3), label, size=11, anchor=anchor,
                 cls="milestone-label", extra=' fill="#222"')
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">'
    return "\n".join([head, f'<rect width="{WIDTH}" height="{height}" fill="white"/>', *svg.parts, "</svg>"]) + "\n"


def write_svg(path: Path, data: TimelineData) -> None:
    path.write_text(render_svg(data), encoding="utf-8")


def from_machine(machine: Machine) -> TimelineData:
    """What a machine run with `MachineConfig.timeline` recorded (after `Machine.run`)."""
    vcpus = [loop.sampler.samples for loop in machine.loops if loop.sampler is not None]
    firsts = [s[0].t for s in vcpus if s]
    start = min(firsts, default=machine.started_at)
    end = max((s[-1].t for s in vcpus if s), default=time.monotonic())
    scanner = machine.console.milestones
    return TimelineData(
        start=start,
        end=end,
        vcpus=vcpus,
        milestones=list(scanner.found) if scanner is not None else [],
        flushes={b.id: list(dev.flush_times or []) for dev, b in machine.pmem_plugged},
    )
