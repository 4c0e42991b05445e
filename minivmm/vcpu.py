"""A vCPU thread: run KVM_RUN, hand each exit to `exit_handler.handle_exit`, count it.

Each vCPU runs `VcpuLoop.run` on its own thread. An exit to userspace is a port or MMIO
access no in-kernel device (irqchip, PIT, ioeventfd) claimed, an emulation failure, or an
event that ends the run. Interrupts and queue notifications never come this way: KVM
delivers them through irqfd/ioeventfd.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Callable, TextIO

from .bus import Bus
from .disasm import LazySymbols
from .exit_handler import ExitParts, Stop, describe, handle_exit
from .fallback import EmulationFallbacks
from .kvm import (
    KVM_MP_STATE_HALTED,
    KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_SIPI_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED,
    Vcpu,
)
from .memory import GuestMemory
from .profiler import VcpuProfile
from .stats import VcpuStats as ExitStats
from .timeline import IntervalSampler
from .vcpu_exit import InterruptedExit

# KVM_GET_MP_STATE values in words (api.rst 4.38), for the state dumps
MP_STATE_NAMES = {
    KVM_MP_STATE_RUNNABLE: "runnable",
    KVM_MP_STATE_UNINITIALIZED: "waiting for INIT/SIPI (an application processor not started yet)",
    KVM_MP_STATE_INIT_RECEIVED: "INIT received, waiting for SIPI",
    KVM_MP_STATE_HALTED: "halted (HLT, waiting for an interrupt)",
    KVM_MP_STATE_SIPI_RECEIVED: "SIPI received",
}
KICK_SIGNAL = signal.SIGUSR2  # interrupts KVM_RUN on a vCPU thread (its handler does nothing)


class VcpuLoop:
    """Runs one vCPU on its own thread until `kick` is called or the guest ends the run."""

    def __init__(
        self,
        vcpu: Vcpu,
        mem: GuestMemory,
        pio: Bus,
        mmio: Bus,
        fallbacks: EmulationFallbacks,
        on_stop: Callable[[Stop], None],
        trace: TextIO | None = None,
        *,
        trace_only: frozenset[str] = frozenset(),
        symbols: LazySymbols | None = None,
    ) -> None:
        self.vcpu = vcpu
        self.on_stop = on_stop
        self.stats = ExitStats(exit_log=[] if trace is not None else None)  # a traced run keeps every exit
        self.parts = ExitParts(
            vcpu, mem, pio, mmio, fallbacks, by_device=self.stats.by_device, trace=trace, log=self.stats.exit_log,
            trace_only=trace_only, symbols=symbols,
        )
        self.stopping = False
        self.describe_requested = False
        self.thread: threading.Thread | None = None
        self._run_allowed = threading.Event()  # cleared by pause(): the thread waits outside KVM_RUN
        self._run_allowed.set()
        self.paused = threading.Event()  # set while the thread waits in pause
        self.sampler: IntervalSampler | None = None  # per-interval snapshots, only for --timeline
        self.profile: VcpuProfile | None = None  # the guest profiler's samples, only for --profile
        self.sample_requested = False
        self.started = vcpu.index == 0  # an application processor starts in wait-for-SIPI

    def record_timeline(self) -> IntervalSampler:
        """Snapshot this vCPU's counters every `timeline.INTERVAL` (call before `start`)."""
        self.sampler = IntervalSampler(self.stats, self.parts.fallbacks.counts)
        return self.sampler

    @property
    def fallbacks(self) -> EmulationFallbacks:
        return self.parts.fallbacks

    # -- control (any thread) --------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name=f"vcpu{self.vcpu.index}", daemon=True)
        self.thread.start()

    def kick(self) -> None:
        """Make KVM_RUN return and the loop end soon, from any thread."""
        self.stopping = True
        self._run_allowed.set()  # a paused vCPU wakes up to end
        self._interrupt()

    def request_describe(self) -> None:
        """Have the vCPU thread print its state (`describe`) and carry on, from any thread.

        A vCPU's registers can only be read by its own thread between two KVM_RUNs, so the
        request interrupts KVM_RUN and the dump happens on the vCPU thread."""
        self.describe_requested = True
        self._interrupt()

    def running(self) -> bool:
        """The thread was started, has not ended and is not paused (it may run guest code)."""
        return self.thread is not None and self.thread.is_alive() and self._run_allowed.is_set()

    def request_sample(self) -> bool:
        """Have the vCPU thread take a profiler sample (`VcpuProfile.record`) and carry on,
        from any thread; False, and nothing done, while the previous request is still pending."""
        if self.sample_requested or self.profile is None:
            return False
        self.profile.kicked_at = time.perf_counter()
        self.sample_requested = True
        self._interrupt()
        return True

    def _interrupt(self) -> None:
        # immediate_exit covers the window before the thread re-enters KVM_RUN; the signal
        # (whose handler does nothing) makes a running KVM_RUN return with EINTR.
        self.vcpu.set_immediate_exit(True)
        if self.thread is not None and self.thread.is_alive() and self.thread.ident is not None:
            try:
                signal.pthread_kill(self.thread.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def pause(self) -> None:
        """Stop running guest code soon (any thread); `paused` is set once the thread waits."""
        self._run_allowed.clear()
        self._interrupt()

    def resume(self) -> None:
        """Let a paused vCPU run again (any thread)."""
        self._run_allowed.set()

    def end(self, status: int, reason: str) -> None:
        """End the run with `status` (from the vCPU thread, e.g. a device on a guest write)."""
        self.stopping = True
        self.on_stop(Stop(status, reason))

    # -- the vCPU thread -------------------------------------------------------------------
    def run(self) -> None:
        stats, parts = self.stats, self.parts
        clock = time.perf_counter
        stats.first_run = time.monotonic()
        sampler = self.sampler
        due = math.inf if sampler is None else sampler.due  # one float compare per exit when off
        try:
            while not self.stopping:
                t0 = clock()
                exit = self.vcpu.run()
                t1 = clock()
                stats.time_in_run += t1 - t0
                if t1 >= due:  # this KVM_RUN's time ends the interval; its exit starts the next
                    due = sampler.sample(t1)  # type: ignore[union-attr]
                stats.by_kind[exit.kind] += 1
                if isinstance(exit, InterruptedExit):
                    self._interrupted()
                stop = handle_exit(exit, parts)
                if stop is not None:
                    self.end(stop.status, stop.reason)
                stats.time_outside += clock() - t1
        except Exception as exc:  # a VMM bug: end the run with a reason rather than a dead thread
            self.end(1, f"vCPU {self.vcpu.index} failed: {type(exc).__name__}: {exc}")
        finally:
            if sampler is not None:
                sampler.sample(clock())  # the last, partial interval

    def _interrupted(self) -> None:
        self.vcpu.set_immediate_exit(False)
        if self.sample_requested:
            if self._started():  # an AP still waiting for SIPI runs no guest code: no sample
                self.profile.record(self.vcpu)  # type: ignore[union-attr]
            self.sample_requested = False  # after: the next kick's time cannot overtake this sample
        if self.describe_requested:
            self.describe_requested = False
            print(self.describe(), file=self.parts.diagnostics, flush=True)
        if not self._run_allowed.is_set():
            self.paused.set()
            self._run_allowed.wait()
            self.paused.clear()

    def _started(self) -> bool:
        """Whether this vCPU has left wait-for-SIPI (the boot vCPU always has). Asked of KVM
        (KVM_GET_MP_STATE) only until the answer is yes."""
        if not self.started:
            self.started = self.vcpu.get_mp_state() not in (KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_INIT_RECEIVED)
        return self.started

    def describe(self) -> str:
        """Registers, the instruction bytes at RIP, the last exits (see `exit_handler.describe`)
        and the multiprocessing state (an application processor may still wait for SIPI)."""
        state = self.vcpu.get_mp_state()
        return f"{describe(self.parts)}\nmp_state: {MP_STATE_NAMES.get(state, str(state))}"


def install_kick_handler() -> None:
    """A no-op handler, so a kick interrupts KVM_RUN (EINTR) instead of killing the process."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        signal.siginterrupt(KICK_SIGNAL, True)
