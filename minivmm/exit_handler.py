"""What the VMM does with each exit from `KVM_RUN`: a function of (exit, machine parts).

`handle_exit(exit, parts)` dispatches a port or MMIO access to the buses, treats an emulation
failure the software KVM leaves to userspace (`fallback.py`), and turns every exit that ends
the run into a `Stop`. It never runs the vCPU itself, so a test can hand it a synthetic exit
(`vcpu_exit.*`) at a stopped vCPU on any host, hardware KVM included.
"""

from __future__ import annotations

import sys
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TextIO

from . import kvm
from .bus import Bus
from .errors import GuestMemoryError
from .fallback import EmulationFallbacks
from .kvm import Vcpu
from .memory import GuestMemory
from .stats import ExitRecord
from .vcpu_exit import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    VcpuExit,
)

MAX_INSN = 15  # the longest x86 instruction (SDM vol. 2, 2.3.11)
X86_CR0_PG = 1 << 31
RECENT_EXITS = 16


@dataclass(frozen=True)
class Stop:
    """Why the run ended and with which exit status.

    `cause` is QEMU's ShutdownCause name (qapi/run-state.json), reported in the QMP
    SHUTDOWN event: "guest-shutdown", "guest-reset", "guest-panic", "host-qmp-quit",
    "host-qmp-system-reset", "host-signal", "host-ui", "host-error"."""

    status: int
    reason: str
    cause: str = field(default="host-error", compare=False)


@dataclass
class ExitParts:
    """The machine parts an exit may touch: one vCPU, guest memory, the buses, the fallback
    table, and where accesses are counted, remembered and traced."""

    vcpu: Vcpu
    mem: GuestMemory
    pio: Bus
    mmio: Bus
    fallbacks: EmulationFallbacks
    by_device: Counter[str] = field(default_factory=Counter)
    recent: deque[ExitRecord] = field(default_factory=lambda: deque(maxlen=RECENT_EXITS))
    trace: TextIO | None = None
    log: list[ExitRecord] | None = None  # every exit, when the run is traced (for --stats-json)
    diagnostics: TextIO = field(default_factory=lambda: sys.stderr)  # where the state dump of a failing vCPU goes

    def record(self, record: ExitRecord) -> None:
        """Count a device access, remember it and trace it."""
        self.by_device[record.device] += 1
        self.remember(record)

    def remember(self, record: ExitRecord) -> None:
        """Keep an exit among the recent ones (for `describe`) and trace it."""
        self.recent.append(record)
        if self.log is not None:
            self.log.append(record)
        if self.trace is not None:
            print(f"[vcpu{self.vcpu.index}] {record}", file=self.trace, flush=True)


def handle_exit(exit: VcpuExit, parts: ExitParts) -> Stop | None:
    """Act on one exit; returns the `Stop` that ends the run, or None to run on.

    An exit that ends the run with a failure first prints the vCPU's state (`describe`) on
    `parts.diagnostics`: a guest never fails silently."""
    if isinstance(exit, IoExit):
        _io(exit, parts)
    elif isinstance(exit, MmioExit):
        _mmio(exit, parts)
    elif isinstance(exit, InterruptedExit):
        pass  # a kick: the caller decides whether to stop or to run on
    elif isinstance(exit, InternalErrorExit):
        return _internal_error(exit, parts)
    elif isinstance(exit, SystemEventExit):
        if exit.type == kvm.KVM_SYSTEM_EVENT_CRASH:
            return Stop(1, "guest reported a crash (KVM_SYSTEM_EVENT_CRASH)", "guest-panic")
        return Stop(0, f"guest system event {exit.type}", "guest-shutdown")
    elif isinstance(exit, HltExit):
        return Stop(0, "guest halted with interrupts off (KVM_EXIT_HLT)", "guest-shutdown")
    elif isinstance(exit, ShutdownExit):
        return _fail(parts, f"guest triple-faulted (KVM_EXIT_SHUTDOWN) at {_where(parts)}")
    elif isinstance(exit, FailEntryExit):
        return _fail(parts, f"KVM could not enter the guest (hardware reason {exit.hardware_entry_failure_reason:#x})")
    else:
        return _fail(parts, f"unexpected KVM exit {exit.kind} at {_where(parts)}")
    return None


def _io(exit: IoExit, parts: ExitParts) -> None:
    port, size, data = exit.port, exit.size, exit.data
    for i in range(exit.count):
        chunk = data[i * size : (i + 1) * size]
        if exit.is_out:
            value = int.from_bytes(chunk, "little")
            rng = parts.pio.write(port, size, value)
        else:
            value, rng = parts.pio.read(port, size)
            chunk[:] = value.to_bytes(size, "little")
        parts.record(ExitRecord("io", "out" if exit.is_out else "in", port, size, value, rng.name if rng else "unclaimed"))


def _mmio(exit: MmioExit, parts: ExitParts) -> None:
    addr, size = exit.addr, exit.size
    if exit.is_write:
        value = int.from_bytes(exit.data, "little")
        rng = parts.mmio.write(addr, size, value)
    else:
        value, rng = parts.mmio.read(addr, size)
        exit.data[:] = value.to_bytes(size, "little")
    parts.record(ExitRecord("mmio", "write" if exit.is_write else "read", addr, size, value, rng.name if rng else "unclaimed"))


def _internal_error(exit: InternalErrorExit, parts: ExitParts) -> Stop | None:
    linear, insn = fetch_instruction(parts.vcpu, parts.mem)
    if exit.suberror == kvm.KVM_INTERNAL_ERROR_EMULATION and parts.fallbacks.handle(parts.vcpu, insn):
        parts.remember(ExitRecord("emulation-fallback", insn[:1].hex(), linear, 0, 0, "fallback"))
        return None
    return _fail(parts, f"KVM internal error (suberror {exit.suberror}) at rip={linear:#x} insn={insn.hex(' ') or '?'}")


def _fail(parts: ExitParts, reason: str) -> Stop:
    print(describe(parts), file=parts.diagnostics, flush=True)
    return Stop(1, reason, "guest-reset" if reason.startswith("guest triple-faulted") else "host-error")


def _where(parts: ExitParts) -> str:
    linear, insn = fetch_instruction(parts.vcpu, parts.mem)
    return f"rip={linear:#x} insn={insn.hex(' ') or '?'}"


# -- diagnostics -----------------------------------------------------------------------------
def fetch_instruction(vcpu: Vcpu, mem: GuestMemory, length: int = MAX_INSN) -> tuple[int, bytes]:
    """(linear RIP, up to `length` instruction bytes at RIP), translated through guest paging.

    Stops early at an unmapped page or outside guest memory (the bytes so far are returned)."""
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    linear = regs.rip if sregs.cs.l else (sregs.cs.base + regs.rip) & 0xFFFFFFFF
    out = b""
    addr = linear
    while len(out) < length:
        chunk = min(length - len(out), 0x1000 - (addr & 0xFFF))
        gpa = vcpu.translate(addr) if sregs.cr0 & X86_CR0_PG else addr
        if gpa is None:
            break
        try:
            out += mem.read(gpa, chunk)
        except GuestMemoryError:
            break
        addr += chunk
    return linear, out


GENERAL_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def describe_registers(vcpu: Vcpu) -> str:
    r, s = vcpu.get_regs(), vcpu.get_sregs()
    names = GENERAL_REGISTERS
    lines = [" ".join(f"{n}={getattr(r, n):016x}" for n in names[i : i + 4]) for i in range(0, 16, 4)]
    lines.append(f"rip={r.rip:016x} rflags={r.rflags:08x} cs={s.cs.selector:04x} ss={s.ss.selector:04x} cpl={s.cs.dpl}")
    lines.append(f"cr0={s.cr0:08x} cr2={s.cr2:016x} cr3={s.cr3:016x} cr4={s.cr4:08x} efer={s.efer:x}")
    return "\n".join(lines)


def describe(parts: ExitParts) -> str:
    """Registers, the instruction bytes at RIP and the last exits: for a stuck or failed guest.
    Only the vCPU's own thread (or anyone while it is stopped) may call this."""
    linear, insn = fetch_instruction(parts.vcpu, parts.mem)
    lines = [f"vCPU {parts.vcpu.index}:", describe_registers(parts.vcpu), f"code at {linear:#x}: {insn.hex(' ') or '?'}"]
    lines.append("last exits:")
    lines += [f"  {r}" for r in parts.recent] or ["  (none)"]
    return "\n".join(lines)
