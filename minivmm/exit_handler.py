"""What the VMM does with each exit from `KVM_RUN`: a function of (exit, machine parts).

`handle_exit(exit, parts)` dispatches a port or MMIO access to the buses, stops the run on a
guest access the host could not back (`unbacked`), treats an emulation
failure the software KVM leaves to userspace (`fallback.py`), and turns every exit that ends
the run into a `Stop`. It never runs the vCPU itself, so a test can hand it a synthetic exit
(`vcpu_exit.*`) at a stopped vCPU on any host, hardware KVM included.
"""

from __future__ import annotations

import sys
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import TextIO

from . import kvm, pmemfile
from .bus import Bus, BusDeviceRange
from .disasm import LazySymbols, cpu_mode, describe_code, instruction_words
from .errors import GuestMemoryError
from .fallback import EmulationFallbacks
from .kvm import Vcpu
from .memory import GuestMemory, Region
from .stats import ExitRecord
from .vcpu_exit import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MemoryFaultExit,
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
    trace_only: frozenset[str] = frozenset()  # --trace=pci,serial,...: the traced kinds/devices (empty: all)
    symbols: LazySymbols | None = None  # the guest kernel's, for instruction dumps

    def record(self, record: ExitRecord, rng: BusDeviceRange | None = None, offset: int = 0) -> None:
        """Count a device access, remember it and trace it (with what it meant, when traced)."""
        self.by_device[record.device] += 1
        if self.trace is not None:
            record = replace(record, meaning=self._meaning(record, rng, offset))
        self.remember(record)

    def remember(self, record: ExitRecord) -> None:
        """Keep an exit among the recent ones (for `describe`) and trace it."""
        self.recent.append(record)
        if self.log is not None:
            self.log.append(record)
        if self.trace is not None and trace_wanted(self.trace_only, record):
            print(f"[vcpu{self.vcpu.index}] {record}", file=self.trace, flush=True)

    def _meaning(self, record: ExitRecord, rng: BusDeviceRange | None, offset: int) -> str:
        """The device's words for an access (`describe`), and for an MMIO exit the instruction."""
        describe_access = getattr(rng.device, "describe", None) if rng is not None else None
        words = describe_access(offset, record.size, record.value, record.op in ("out", "write")) if describe_access else None
        if record.kind == "mmio":
            # KVM exits for a write once the instruction is done (RIP is past it); a read's
            # instruction waits at RIP for the data (api.rst, KVM_EXIT_MMIO; x86 emulator).
            where = "rip after the write" if record.op == "write" else "at rip"
            code = f"[{where}: {describe_code_at(self)}]"
            words = f"{words} {code}" if words else code
        return words or ""


def trace_wanted(only: frozenset[str], record: ExitRecord) -> bool:
    """Whether `--trace=LIST` shows this exit: LIST names exit kinds (io, mmio,
    emulation-fallback), device names or their dash-separated words (serial, pci, pmem0,
    acpi-sleep, unclaimed), or the first word of what the access meant (virtio)."""
    if not only:
        return True
    names = {record.kind, record.device, *record.device.split("-"), record.meaning.split(" ", 1)[0].lower()}
    return not only.isdisjoint(names)


def handle_exit(exit: VcpuExit, parts: ExitParts) -> Stop | None:
    """Act on one exit; returns the `Stop` that ends the run, or None to run on.

    An exit that ends the run with a failure first prints the vCPU's state (`describe`) on
    `parts.diagnostics`: a guest never fails silently."""
    if isinstance(exit, IoExit):
        _io(exit, parts)
    elif isinstance(exit, MmioExit):
        return _mmio(exit, parts)
    elif isinstance(exit, MemoryFaultExit):
        return _memory_fault(exit, parts)
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
        record = ExitRecord("io", "out" if exit.is_out else "in", port, size, value, rng.name if rng else "unclaimed")
        parts.record(record, rng, port - rng.base if rng else 0)


def _mmio(exit: MmioExit, parts: ExitParts) -> Stop | None:
    addr, size = exit.addr, exit.size
    region = parts.mem.region_at(addr)
    if region is not None and region.readonly and exit.is_write:
        # A store into a read-only slot (KVM_MEM_READONLY) exits by design: it goes nowhere.
        parts.record(ExitRecord("mmio", "write", addr, size, int.from_bytes(exit.data, "little"), f"{region.name} (read-only)"))
        return None
    if region is not None:  # KVM could not back this page of a memory slot (kvm_pvm's form)
        return unbacked(region, addr, size, "write" if exit.is_write else "read")
    if exit.is_write:
        value = int.from_bytes(exit.data, "little")
        rng = parts.mmio.write(addr, size, value)
    else:
        value, rng = parts.mmio.read(addr, size)
        exit.data[:] = value.to_bytes(size, "little")
    record = ExitRecord("mmio", "write" if exit.is_write else "read", addr, size, value, rng.name if rng else "unclaimed")
    parts.record(record, rng, addr - rng.base if rng else 0)
    return None


# -- guest accesses the host could not back ------------------------------------------------------
def unbacked(region: Region, gpa: int, size: int, access: str = "access") -> Stop:
    """Stop the run (status 1, one line) on a guest access to `region` that KVM could not map
    to host memory: dropping it would lose a write silently. The region's owner is told first
    (`Region.on_fault`), so a later flush of its data cannot report success."""
    offset = region.file_offset + gpa - region.gpa
    if region.file is None:
        cause = "guest RAM the host could not allocate (host out of memory?)"
    else:
        cause = f"file {region.file} offset {offset:#x}: {pmemfile.unbacked_cause(region.file, offset, max(size, 1))}"
    reason = f"{region.name}: a guest {size}-byte {access} at {gpa:#x} could not be backed by the host: {cause}"
    if region.on_fault is not None:
        region.on_fault(reason)
    return Stop(1, reason)


def _memory_fault(exit: MemoryFaultExit, parts: ExitParts) -> Stop:
    """`KVM_RUN` failed with EFAULT (hardware KVM's form of an unbackable page)."""
    if exit.gpa is not None and (region := parts.mem.region_at(exit.gpa)) is not None:
        return unbacked(region, exit.gpa, exit.size)
    # No page named: every file-backed region is suspect, and none may report a flush as done.
    suspects = [(r, r.file) for r in parts.mem.regions if r.file is not None]
    causes = [f"{r.name} (file {file}): {pmemfile.unbacked_cause(file, r.file_offset, r.size)}" for r, file in suspects]
    where = f" at {exit.gpa:#x}" if exit.gpa is not None else ""
    reason = f"KVM_RUN failed with EFAULT{where}: a guest page could not be backed by the host; " + (
        "; ".join(causes) if causes else "no backing file; host out of memory?"
    )
    for r, _ in suspects:
        if r.on_fault is not None:
            r.on_fault(reason)
    return Stop(1, reason)


def _internal_error(exit: InternalErrorExit, parts: ExitParts) -> Stop | None:
    linear, insn = fetch_instruction(parts.vcpu, parts.mem)
    if exit.suberror == kvm.KVM_INTERNAL_ERROR_EMULATION and parts.fallbacks.handle(parts.vcpu, insn):
        parts.remember(ExitRecord("emulation-fallback", insn[:1].hex(), linear, 0, 0, "fallback"))
        return None
    return _fail(parts, f"KVM internal error (suberror {exit.suberror}) at {_where(parts)}")


def _fail(parts: ExitParts, reason: str) -> Stop:
    print(describe(parts), file=parts.diagnostics, flush=True)
    return Stop(1, reason, "guest-reset" if reason.startswith("guest triple-faulted") else "host-error")


def _where(parts: ExitParts) -> str:
    """rip, the instruction bytes there and, on one line, their disassembly."""
    linear, insn = fetch_instruction(parts.vcpu, parts.mem)
    cs = parts.vcpu.get_sregs().cs
    return f"rip={linear:#x} insn={insn.hex(' ') or '?'} ({instruction_words(insn, linear, cpu_mode(cs.l, cs.db), parts.symbols)})"


def describe_code_at(parts: ExitParts, linear: int | None = None, insn: bytes | None = None, count: int = 1) -> str:
    """The instruction(s) at the vCPU's RIP disassembled, with the kernel symbol when known."""
    if linear is None or insn is None:
        linear, insn = fetch_instruction(parts.vcpu, parts.mem)
    cs = parts.vcpu.get_sregs().cs
    return describe_code(insn, linear, cpu_mode(cs.l, cs.db), parts.symbols, count)


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
    lines += [f"  {line}" for line in describe_code_at(parts, linear, insn, count=3).splitlines()]
    lines.append("last exits:")
    lines += [f"  {r}" for r in parts.recent] or ["  (none)"]
    return "\n".join(lines)
