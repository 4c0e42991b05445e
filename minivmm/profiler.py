"""The guest profiler (`minivmm run --profile[=HZ]`): where the guest's time goes, by function.

A sampler thread wakes HZ times a second and kicks every running vCPU thread (`VcpuLoop.
request_sample`: immediate_exit plus a signal, as a pause or a state dump does). KVM_RUN
returns EINTR; between that KVM_RUN and the next, the vCPU thread reads its instruction
pointer and privilege level (`VcpuProfile.record`) and resumes the guest. At exit the samples
are counted per guest function, symbolised from the kernel's ELF `.symtab` (`disasm.
KernelSymbols`, the table `--trace` uses) or from a `System.map` (`nm -n` output, as
/proc/kallsyms prints it): `--profile-map FILE`, or the one next to the default guest's
kernel. Samples taken in user mode (CPL 3) count as "[user]": the guest's programs have
no symbols here.

Each sample costs the guest one exit to the VMM, a register read from kvm_run and a count;
the profile states the VMM's part (`ProfileStats.render_text`), and `bench/profile_overhead.py`
measures the whole by booting with and without it.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from .disasm import KernelSymbols, LazySymbols
from .errors import UserError, report_thread_error

# 10 ms between samples: thousands over a boot. A sample costs the guest an exit and re-entry:
# tens of µs on hardware KVM, ~1.4 ms on kvm_pvm (README "Profiling the guest"), so ~14 % there.
DEFAULT_HZ = 100
MAX_HZ = 10_000  # one sample every 100 µs: even at ~10 µs each, 10 % of the guest's time
TOP = 25  # functions the text report lists
USER = "[user]"  # every user-mode sample (CPL 3): guest programs are not symbolised
NO_SYMBOL = "[no symbol]"  # a kernel-mode address outside every known function
# ... below 4 GiB: code running at physical (identity-mapped) addresses before the kernel's
# own mapping, e.g. a bzImage's decompressor, which no kernel symbol table covers.
NO_SYMBOL_LOW = "[no symbol, below 4 GiB]"
CR0_PE = 1 << 0  # protection enable (SDM vol. 3, 2.5): without it the CPU runs in real mode, CPL 0
RFLAGS_VM = 1 << 17  # virtual-8086 mode (SDM vol. 3, 20.2): CPL 3
# KVM_CAP_SYNC_REGS (api.rst, "KVM_CAP_SYNC_REGS"; 5, "kvm_valid_regs"): KVM copies the
# registers named in kvm_run.kvm_valid_regs into kvm_run.s (struct kvm_sync_regs: kvm_regs,
# kvm_sregs, kvm_vcpu_events) whenever KVM_RUN returns, so a sample reads memory instead of
# making two ioctls (each ~6 µs from Python here).
KVM_CAP_SYNC_REGS = 74
KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1


SOFTWARE_KVM_SAMPLE_COST_S = 1.4e-3  # guest time per sample on kvm_pvm (bench/profile_overhead.py)


def sampling_warning(hz: int, vcpus: int, software_kvm: bool) -> str | None:
    """A warning when `hz` samples a second on each of `vcpus` would take a large share of an
    emulated guest's time (software KVM: each sample costs it ~1.4 ms); None otherwise."""
    share = hz * SOFTWARE_KVM_SAMPLE_COST_S
    if not software_kvm or share < 0.25:
        return None
    return (f"--profile={hz} on a software KVM: each sample costs the guest about "
            f"{SOFTWARE_KVM_SAMPLE_COST_S * 1e3:.1f} ms, so each of the {vcpus} vCPU(s) loses "
            f"{'most' if share >= 1 else f'about {share:.0%}'} of its time to sampling; {DEFAULT_HZ} Hz costs about "
            f"{DEFAULT_HZ * SOFTWARE_KVM_SAMPLE_COST_S:.0%}")


def parse_hz(text: str) -> int:
    """--profile=HZ as a whole number of samples per second, 1..MAX_HZ (UserError otherwise)."""
    try:
        hz = int(text, 10)
    except ValueError:
        hz = 0
    if not 1 <= hz <= MAX_HZ:
        raise UserError(f"--profile={text}: HZ must be a whole number of samples per second from 1 to {MAX_HZ}")
    return hz


def guest_cpl(cr0: int, rflags: int, ss_dpl: int) -> int:
    """The current privilege level as KVM keeps it: SS.DPL in protected mode (SDM vol. 3, 5.5:
    CPL is the DPL of SS; KVM's vmx_get_cpl reads SS's access rights and SVM reports VMCB.CPL
    there), 0 in real mode, 3 in virtual-8086 mode. CS.RPL would be wrong in real mode, where
    CS holds a paragraph number."""
    if not cr0 & CR0_PE:
        return 0
    if rflags & RFLAGS_VM:
        return 3
    return ss_dpl


class SampledVcpu(Protocol):
    """What a sample reads: `kvm.Vcpu`'s KVM_GET_REGS and KVM_GET_SREGS."""

    def get_regs(self) -> Any: ...

    def get_sregs(self) -> Any: ...


class SyncedRegisters:
    """A vCPU's `kvm_run.s` (struct kvm_sync_regs), kept current by KVM at every KVM_RUN
    return once `enable` set kvm_valid_regs. Read only between two KVM_RUNs (the vCPU thread)."""

    def __init__(self, vcpu: Any) -> None:
        from .kvm import ffi

        self.regs = ffi.cast("struct kvm_regs *", ffi.addressof(vcpu.kvm_run.s))
        self.sregs = ffi.cast("struct kvm_sregs *", ffi.cast("char *", self.regs) + ffi.sizeof("struct kvm_regs"))

    @staticmethod
    def enable(vcpu: Any) -> SyncedRegisters | None:
        """Have KVM keep `vcpu`'s regs and sregs in kvm_run (before it runs); None when KVM
        cannot (then a sample makes the two ioctls). Every exit then pays KVM's copy (in the
        kernel, well under a microsecond), so only a profiled run asks for it."""
        wanted = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS
        if vcpu.vm.kvm.check_extension(KVM_CAP_SYNC_REGS) & wanted != wanted:
            return None
        vcpu.kvm_run.kvm_valid_regs = wanted
        return SyncedRegisters(vcpu)

    def get_regs(self) -> Any:
        return self.regs

    def get_sregs(self) -> Any:
        return self.sregs


@dataclass
class VcpuProfile:
    """One vCPU's samples. Written by its own thread (`record`), read by any (`snapshot`)."""

    registers: SampledVcpu | None = None  # where a sample reads: kvm_run's synced copy (else the vCPU's ioctls)
    kernel: Counter[int] = field(default_factory=Counter)  # RIP -> samples taken at CPL 0-2
    user: int = 0  # samples taken at CPL 3
    kicked_at: float = 0.0  # perf_counter() of the last kick (set by the sampler thread)
    latency: float = 0.0  # kick -> registers read, summed: how late a sample is (the guest ran on meanwhile)
    handling: float = 0.0  # the sample on the vCPU thread (read, classify, count), summed: the VMM's cost
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def samples(self) -> int:
        return sum(self.kernel.values()) + self.user

    def record(self, vcpu: SampledVcpu) -> None:
        """Take one sample (on the vCPU thread, between two KVM_RUNs: only then are its
        registers readable)."""
        t0 = time.perf_counter()
        source = self.registers or vcpu
        regs, sregs = source.get_regs(), source.get_sregs()
        rip, cpl = regs.rip, guest_cpl(sregs.cr0, regs.rflags, sregs.ss.dpl)
        with self.lock:
            if cpl == 3:
                self.user += 1
            else:
                self.kernel[rip] += 1
            self.latency += t0 - self.kicked_at
            self.handling += time.perf_counter() - t0

    def snapshot(self) -> tuple[Counter[int], int, float, float]:
        """(kernel RIP counts, user samples, latency, handling time), copied consistently."""
        with self.lock:
            return Counter(self.kernel), self.user, self.latency, self.handling


class Sampled(Protocol):
    """What the sampler kicks: `vcpu.VcpuLoop`."""

    profile: VcpuProfile | None
    vcpu: Any  # kvm.Vcpu

    def running(self) -> bool: ...

    def request_sample(self) -> bool: ...


# -- symbols ---------------------------------------------------------------------------------
# A System.map / kallsyms line: address, type letter, name, and in kallsyms an optional [module].
MAP_LINE = re.compile(r"([0-9a-fA-F]{1,16})\s+([A-Za-z?])\s+(\S+)(?:\s+\[\S+\])?")
TEXT_TYPES = frozenset("TtWw")  # code (nm(1): T/t text section, W/w weak symbols, here functions)


def parse_system_map(text: str) -> KernelSymbols:
    """The text symbols of a System.map or /proc/kallsyms (`nm -n`: "address type name" per
    line), as the symbol table `--trace` uses. A map has no sizes: a function ends where the
    next symbol of any type starts (so an address in data after the last function of a section
    has no symbol); the last one is a label. Lines that are no symbol line are skipped."""
    rows: list[tuple[int, str, str]] = []
    for line in text.splitlines():
        m = MAP_LINE.fullmatch(line.strip())
        if m is not None and int(m[1], 16):
            rows.append((int(m[1], 16), m[2], m[3]))
    starts = sorted({addr for addr, _, _ in rows})
    following = dict(zip(starts, starts[1:]))  # each start -> the next greater one
    best: dict[int, tuple[str, int]] = {}
    for addr, kind, name in rows:
        if kind in TEXT_TYPES and addr not in best:  # the first name at an address (nm -n order)
            best[addr] = (name, following.get(addr, addr) - addr)
    addresses = sorted(best)
    return KernelSymbols(addresses, [best[a] for a in addresses])


MAX_SYSTEM_MAP = 64 << 20  # bytes


def load_system_map(path: Path) -> KernelSymbols:
    """`parse_system_map` of a file; UserError (one line) when it cannot be read or holds no function."""
    try:
        with path.open("rb") as f:
            # A System.map is a few MB, a /proc/kallsyms copy tens: anything far larger is not one.
            data = f.read(MAX_SYSTEM_MAP + 1)
    except OSError as exc:
        raise UserError(f"--profile-map {path}: {exc.strerror}") from None
    if len(data) > MAX_SYSTEM_MAP:
        raise UserError(f"--profile-map {path}: larger than {MAX_SYSTEM_MAP >> 20} MiB, not a System.map")
    symbols = parse_system_map(data.decode("utf-8", "replace"))
    if not symbols.addresses:
        raise UserError(f"--profile-map {path}: no function symbols (expected System.map lines: ADDRESS TYPE NAME)")
    return symbols


def default_system_map(kernel: Path) -> Path | None:
    """The System.map the default guest's build left next to `kernel`, when `kernel` is the
    default guest's vmlinux or bzImage (another kernel's directory may hold another map)."""
    from .guestmanifest import read_manifest

    try:
        manifest = read_manifest()
    except UserError:
        return None
    if manifest is None:
        return None
    try:
        own = kernel.resolve() in {path.resolve() for path in manifest.kernels().values()}
    except OSError:
        return None
    candidate = kernel.parent / "System.map"
    return candidate if own and candidate.is_file() else None


class ProfileSymbols:
    """Names the function at a guest address: from `--profile-map`, else the kernel's ELF
    `.symtab`, else the default guest's System.map; loaded on first use (at the report)."""

    def __init__(self, elf: LazySymbols, system_map: KernelSymbols | None = None, map_path: Path | None = None) -> None:
        self.elf = elf
        self._map = system_map  # an explicit --profile-map, parsed up front (its errors are the user's)
        self._map_path = map_path
        self._lock = threading.Lock()
        self._table: KernelSymbols | None = None
        self._source: str | None = None
        self._names: dict[int, str] = {}

    def _load(self) -> tuple[KernelSymbols | None, str]:
        if self._source is None:
            if self._map is not None:
                self._table, self._source = self._map, f"System.map {self._map_path}"
            elif (elf := self.elf.get()) is not None:
                self._table, self._source = elf, f"ELF .symtab of {self.elf.path}"
            elif self.elf.path is not None and (found := default_system_map(self.elf.path)) is not None:
                self._table, self._source = parse_system_map(found.read_text("utf-8", "replace")), f"System.map {found}"
            else:
                self._source = "none (a kernel without .symtab: give --profile-map System.map)"
        return self._table, self._source

    @property
    def source(self) -> str:
        with self._lock:
            return self._load()[1]

    def function(self, address: int) -> str:
        """The name of the function holding `address` ("do_idle"), NO_SYMBOL(_LOW) outside
        every function, the address itself when there is no symbol table at all."""
        with self._lock:
            table, _ = self._load()
            name = self._names.get(address)
            if name is None:
                if table is None:
                    name = f"{address:#x}"
                else:
                    found = table.lookup(address)  # "name+0xoff/0xsize"
                    unnamed = NO_SYMBOL_LOW if address < 1 << 32 else NO_SYMBOL
                    name = unnamed if found is None else found.rsplit("+", 1)[0]
                self._names[address] = name
            return name


# -- the snapshot ------------------------------------------------------------------------------
@dataclass
class VcpuProfileStats:
    """One vCPU's samples by function (USER: all of its user-mode samples)."""

    index: int
    kernel: int
    user: int
    functions: dict[str, int]  # most samples first

    @property
    def samples(self) -> int:
        return self.kernel + self.user

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "samples": self.samples, "kernel": self.kernel, "user": self.user, "functions": dict(self.functions)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VcpuProfileStats:
        return cls(d["index"], d["kernel"], d["user"], dict(d["functions"]))


@dataclass
class ProfileStats:
    """A profile snapshot (`Profiler.statistics`), part of `stats.MachineStats`; times in seconds."""

    hz: int
    symbols: str  # where the names come from
    vcpus: list[VcpuProfileStats]
    duration: float  # how long the sampler ran
    missed: int  # kicks not sent because the vCPU had not yet taken the previous one
    latency: float  # kick -> registers read, summed over the vCPUs
    handling: float  # the samples' time on the vCPU threads (registers read, counted), summed

    @property
    def samples(self) -> int:
        return sum(v.samples for v in self.vcpus)

    @property
    def user(self) -> int:
        return sum(v.user for v in self.vcpus)

    @property
    def kernel(self) -> int:
        return sum(v.kernel for v in self.vcpus)

    def functions(self) -> Counter[str]:
        """Samples by function over every vCPU (USER for user mode)."""
        total: Counter[str] = Counter()
        for v in self.vcpus:
            total.update(v.functions)
        return total

    @property
    def cost_per_sample(self) -> float:
        """The VMM's time per sample on the vCPU thread (the exit and re-entry of KVM_RUN it
        causes come on top: `bench/profile_overhead.py` measures the whole)."""
        return self.handling / self.samples if self.samples else 0.0

    @property
    def mean_latency(self) -> float:
        return self.latency / self.samples if self.samples else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "hz": self.hz,
            "symbols": self.symbols,
            "samples": self.samples,
            "kernel": self.kernel,
            "user": self.user,
            "functions": dict(self.functions().most_common()),
            "vcpus": [v.to_dict() for v in self.vcpus],
            "duration_s": self.duration,
            "missed": self.missed,
            "latency_s": self.latency,
            "handling_s": self.handling,
            "cost_per_sample_us": self.cost_per_sample * 1e6,
            "mean_latency_us": self.mean_latency * 1e6,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProfileStats:
        return cls(d["hz"], d["symbols"], [VcpuProfileStats.from_dict(v) for v in d["vcpus"]],
                   d["duration_s"], d["missed"], d["latency_s"], d["handling_s"])

    def render_text(self, top: int = TOP) -> str:
        """The `--profile` report: totals, per-vCPU shares, cost, then the top functions."""
        n = self.samples
        pct = (lambda k: 100.0 * k / n) if n else (lambda k: 0.0)
        lines = [
            f"profile: {n} samples at {self.hz} Hz over {self.duration:.2f} s; guest kernel {pct(self.kernel):.1f} %, "
            f"user {pct(self.user):.1f} %" + (f"; {self.missed} kicks skipped (vCPU busy)" if self.missed else ""),
            "profile: " + ", ".join(f"vcpu{v.index} {v.samples} ({pct(v.samples):.1f} %)" for v in self.vcpus),
            f"profile: cost {self.handling * 1e3:.1f} ms on the vCPU threads = {n} samples x {self.cost_per_sample * 1e6:.1f} µs "
            f"(read and count), plus one exit from KVM_RUN and re-entry per sample (bench/profile_overhead.py); "
            f"kick to sample {self.mean_latency * 1e6:.0f} µs on average",
            f"profile: symbols: {self.symbols}",
            f"{'samples':>9} {'%':>6}  function",
        ]
        lines += [f"{k:>9} {pct(k):>6.1f}  {name}" for name, k in self.functions().most_common(top)]
        return "\n".join(lines)


# -- the sampler thread ----------------------------------------------------------------------
class Profiler:
    """Samples every vCPU loop in `loops` at `hz` (a list the machine may append to) from its own thread."""

    def __init__(self, loops: Sequence[Sampled], hz: int, symbols: ProfileSymbols) -> None:
        self.loops = loops
        self.hz = hz
        self.symbols = symbols
        self.missed = 0
        self.errors: list[BaseException] = []  # what ended the sampler thread early (`report_thread_error`)
        self.started_at: float | None = None
        self.stopped_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for loop in loops:
            self.attach(loop)

    @staticmethod
    def attach(loop: Sampled) -> VcpuProfile:
        """Give `loop` a sample store (before it runs), reading kvm_run's synced registers
        when KVM offers them."""
        if loop.profile is None:
            loop.profile = VcpuProfile(SyncedRegisters.enable(loop.vcpu))
        return loop.profile

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="profiler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (idempotent); the samples stay."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.started_at is not None and self.stopped_at is None:
            self.stopped_at = time.monotonic()

    def _run(self) -> None:
        try:
            self._sample_until_stopped()
        except Exception as exc:  # a VMM bug: the guest runs on unprofiled, and the run reports it
            report_thread_error("profiler", exc, self.errors)

    def _sample_until_stopped(self) -> None:
        period = 1.0 / self.hz
        due = time.monotonic() + period
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            for loop in list(self.loops):  # every vCPU, also one added after the start
                self.attach(loop)
                if loop.running() and not loop.request_sample():
                    self.missed += 1
            # Absolute deadlines keep the rate; a sampler that fell behind skips, not bursts.
            due = max(due + period, time.monotonic())

    def statistics(self) -> ProfileStats:
        """A snapshot, symbolised (the first call loads the symbols)."""
        vcpus, latency, handling = [], 0.0, 0.0
        for index, loop in enumerate(self.loops):
            profile = self.attach(loop)
            kernel, user, lat, hand = profile.snapshot()
            latency, handling = latency + lat, handling + hand
            functions: Counter[str] = Counter()
            for rip, k in kernel.items():
                functions[self.symbols.function(rip)] += k
            if user:
                functions[USER] += user
            vcpus.append(VcpuProfileStats(index, sum(kernel.values()), user, dict(functions.most_common())))
        end = self.stopped_at if self.stopped_at is not None else time.monotonic()
        duration = 0.0 if self.started_at is None else end - self.started_at
        return ProfileStats(self.hz, self.symbols.source, vcpus, duration, self.missed, latency, handling)
