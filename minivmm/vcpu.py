"""The vCPU exit path: run KVM_RUN, dispatch each exit to the buses, count and trace it.

Each vCPU runs `VcpuLoop.run` on its own thread. An exit to userspace is a port or MMIO
access no in-kernel device (irqchip, PIT, ioeventfd) claimed, an emulation failure, or an
event that ends the run. Interrupts and queue notifications never come this way: KVM
delivers them through irqfd/ioeventfd.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, TextIO

from . import kvm
from .bus import Bus
from .fallback import EmulationFallbacks
from .kvm import Vcpu
from .memory import GuestMemory
from .stats import ExitRecord
from .stats import VcpuStats as ExitStats

KICK_SIGNAL = signal.SIGUSR2  # interrupts KVM_RUN on a vCPU thread (its handler does nothing)
MAX_INSN = 15


@dataclass
class Stop:
    """Why the run ended and with which exit status."""

    status: int
    reason: str


def fetch_instruction(vcpu: Vcpu, mem: GuestMemory, length: int = MAX_INSN) -> tuple[int, bytes]:
    """(linear RIP, up to `length` instruction bytes at RIP), translated through guest paging."""
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    linear = regs.rip if sregs.cs.l else (sregs.cs.base + regs.rip) & 0xFFFFFFFF
    out = b""
    addr = linear
    while len(out) < length:
        chunk = min(length - len(out), 0x1000 - (addr & 0xFFF))
        gpa = vcpu.translate(addr) if sregs.cr0 & 0x80000000 else addr
        if gpa is None:
            break
        try:
            out += mem.read(gpa, chunk)
        except Exception:
            break
        addr += chunk
    return linear, out


def describe_registers(vcpu: Vcpu) -> str:
    r, s = vcpu.get_regs(), vcpu.get_sregs()
    names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
    lines = [" ".join(f"{n}={getattr(r, n):016x}" for n in names[i : i + 4]) for i in range(0, 16, 4)]
    lines.append(f"rip={r.rip:016x} rflags={r.rflags:08x} cs={s.cs.selector:04x} ss={s.ss.selector:04x} cpl={s.cs.dpl}")
    lines.append(f"cr0={s.cr0:08x} cr2={s.cr2:016x} cr3={s.cr3:016x} cr4={s.cr4:08x} efer={s.efer:x}")
    return "\n".join(lines)


class VcpuLoop:
    """Runs one vCPU until `stop` is called or the guest ends the run."""

    def __init__(
        self,
        vcpu: Vcpu,
        mem: GuestMemory,
        pio: Bus,
        mmio: Bus,
        fallbacks: EmulationFallbacks,
        on_stop: Callable[[Stop], None],
        trace: TextIO | None = None,
    ) -> None:
        self.vcpu = vcpu
        self.mem = mem
        self.pio = pio
        self.mmio = mmio
        self.fallbacks = fallbacks
        self.on_stop = on_stop
        self.trace = trace
        self.stats = ExitStats(exit_log=[] if trace is not None else None)  # a traced run keeps every exit
        self.recent: deque[ExitRecord] = deque(maxlen=16)
        self.stopping = False
        self.describe_requested = False
        self.diagnostics = sys.stderr  # where state dumps go
        self.thread: threading.Thread | None = None
        self._handlers = {
            kvm.KVM_EXIT_IO: self._io,
            kvm.KVM_EXIT_MMIO: self._mmio,
            kvm.KVM_EXIT_INTR: self._interrupted,
            kvm.KVM_EXIT_HLT: lambda: self._end(0, "guest halted with interrupts off (KVM_EXIT_HLT)"),
            kvm.KVM_EXIT_SHUTDOWN: lambda: self._fail(f"guest triple-faulted (KVM_EXIT_SHUTDOWN) at {self._where()}"),
            kvm.KVM_EXIT_SYSTEM_EVENT: self._system_event,
            kvm.KVM_EXIT_INTERNAL_ERROR: self._internal_error,
            kvm.KVM_EXIT_FAIL_ENTRY: lambda: self._fail(
                f"KVM could not enter the guest (hardware reason {self.vcpu.run.u.fail_entry.hardware_entry_failure_reason:#x})"
            ),
        }

    # -- control ---------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name=f"vcpu{self.vcpu.index}", daemon=True)
        self.thread.start()

    def kick(self) -> None:
        """Make KVM_RUN return and the loop end soon, from any thread."""
        self.stopping = True
        self._interrupt()

    def request_describe(self) -> None:
        """Have the vCPU thread print its state (`describe`) and carry on, from any thread.

        A vCPU's registers can only be read by its own thread between two KVM_RUNs, so the
        request interrupts KVM_RUN and the dump happens on the vCPU thread."""
        self.describe_requested = True
        self._interrupt()

    def _interrupt(self) -> None:
        # immediate_exit covers the window before the thread re-enters KVM_RUN; the signal
        # (whose handler does nothing) makes a running KVM_RUN return with EINTR.
        self.vcpu.run.immediate_exit = 1
        if self.thread is not None and self.thread.is_alive() and self.thread.ident is not None:
            try:
                signal.pthread_kill(self.thread.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def _interrupted(self) -> None:
        self.vcpu.run.immediate_exit = 0
        if self.describe_requested:
            self.describe_requested = False
            print(self.describe(), file=self.diagnostics, flush=True)

    def run(self) -> None:
        run = self.vcpu.run
        stats = self.stats
        clock = time.perf_counter
        stats.first_run = time.monotonic()
        try:
            while not self.stopping:
                t0 = clock()
                self.vcpu.run_once()
                t1 = clock()
                stats.time_in_run += t1 - t0
                reason = run.exit_reason
                kind = kvm.EXIT_NAMES.get(reason, f"exit{reason}")
                stats.by_kind[kind] += 1
                handler = self._handlers.get(reason)
                if handler is None:
                    self._fail(f"unexpected KVM exit {kind} at {self._where()}")
                else:
                    handler()
                stats.time_outside += clock() - t1
        except Exception as exc:  # a VMM bug: end the run with a reason rather than a dead thread
            self._end(1, f"vCPU {self.vcpu.index} failed: {type(exc).__name__}: {exc}")

    def _fail(self, reason: str) -> None:
        """End the run with status 1 after dumping this vCPU's state (a guest never fails silently)."""
        print(self.describe(), file=self.diagnostics, flush=True)
        self._end(1, reason)

    def _end(self, status: int, reason: str) -> None:
        self.stopping = True
        self.on_stop(Stop(status, reason))

    # -- exits -----------------------------------------------------------------------------
    def _record(self, record: ExitRecord) -> None:
        self.recent.append(record)
        if self.stats.exit_log is not None:  # --trace: the whole log goes to --stats-json
            self.stats.exit_log.append(record)
        if self.trace is not None:
            print(f"[vcpu{self.vcpu.index}] {record}", file=self.trace, flush=True)

    def _io(self) -> None:
        io = self.vcpu.run.u.io
        port, size, count = io.port, io.size, io.count
        data = self.vcpu.io_data()
        out = io.direction == kvm.KVM_EXIT_IO_OUT
        for i in range(count):
            chunk = data[i * size : (i + 1) * size]
            if out:
                value = int.from_bytes(chunk, "little")
                rng = self.pio.write(port, size, value)
            else:
                value, rng = self.pio.read(port, size)
                chunk[:] = value.to_bytes(size, "little")
            name = rng.name if rng else "unclaimed"
            self.stats.by_device[name] += 1
            self._record(ExitRecord("io", "out" if out else "in", port, size, value, name))

    def _mmio(self) -> None:
        m = self.vcpu.run.u.mmio
        addr, size = m.phys_addr, m.len
        if m.is_write:
            value = int.from_bytes(bytes(m.data[0:size]), "little")
            rng = self.mmio.write(addr, size, value)
        else:
            value, rng = self.mmio.read(addr, size)
            for i, b in enumerate(value.to_bytes(size, "little")):
                m.data[i] = b
        name = rng.name if rng else "unclaimed"
        self.stats.by_device[name] += 1
        self._record(ExitRecord("mmio", "write" if m.is_write else "read", addr, size, value, name))

    def _system_event(self) -> None:
        ev = self.vcpu.run.u.system_event.type
        if ev == kvm.KVM_SYSTEM_EVENT_CRASH:
            self._end(1, "guest reported a crash (KVM_SYSTEM_EVENT_CRASH)")
        else:
            self._end(0, f"guest system event {ev}")

    def _internal_error(self) -> None:
        internal = self.vcpu.run.u.internal
        linear, insn = fetch_instruction(self.vcpu, self.mem)
        if internal.suberror == kvm.KVM_INTERNAL_ERROR_EMULATION and self.fallbacks.handle(self.vcpu, insn):
            self._record(ExitRecord("emulation-fallback", insn[:1].hex(), linear, 0, 0, "fallback"))
            return
        self._fail(f"KVM internal error (suberror {internal.suberror}) at rip={linear:#x} insn={insn.hex(' ') or '?'}")

    def _where(self) -> str:
        linear, insn = fetch_instruction(self.vcpu, self.mem)
        return f"rip={linear:#x} insn={insn.hex(' ') or '?'}"

    def describe(self) -> str:
        """Registers, the instruction bytes at RIP and the last exits: for a stuck or failed guest."""
        linear, insn = fetch_instruction(self.vcpu, self.mem)
        lines = [f"vCPU {self.vcpu.index}:", describe_registers(self.vcpu), f"code at {linear:#x}: {insn.hex(' ') or '?'}"]
        lines.append("last exits:")
        lines += [f"  {r}" for r in self.recent] or ["  (none)"]
        return "\n".join(lines)


def install_kick_handler() -> None:
    """A no-op handler, so a kick interrupts KVM_RUN (EINTR) instead of killing the process."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        signal.siginterrupt(KICK_SIGNAL, True)

