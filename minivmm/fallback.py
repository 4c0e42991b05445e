"""Exact treatments for instructions a software KVM fails to emulate.

kvm_pvm emulates guest kernel code and stops with KVM_EXIT_INTERNAL_ERROR (suberror
KVM_INTERNAL_ERROR_EMULATION) on a few instructions whose architectural effect the VMM can
reproduce exactly from userspace. Each row of `FALLBACKS` names the opcode and what the CPU
would have done (Intel SDM vol. 2). On hardware KVM these exits never happen, so the table is
never consulted there. Anything not in the table ends the run with a diagnosis.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

from .kvm import Vcpu

BP_VECTOR = 3  # #BP, a trap: the saved RIP is the byte after INT3
MF_VECTOR = 16  # #MF, a fault: the saved RIP is the FWAIT itself
X87_EXCEPTION_FLAGS = 0x3F  # IE DE ZE OE UE PE in both FSW and FCW


def inject_exception(vcpu: Vcpu, vector: int) -> None:
    events = vcpu.get_vcpu_events()
    events.exception.injected = 1
    events.exception.pending = 0
    events.exception.nr = vector
    events.exception.has_error_code = 0
    events.exception.error_code = 0
    events.flags = 0  # leave NMI-pending, SIPI and interrupt shadow as they are
    vcpu.set_vcpu_events(events)


def _advance(vcpu: Vcpu, length: int) -> None:
    regs = vcpu.get_regs()
    regs.rip += length
    vcpu.set_regs(regs)


def int3(vcpu: Vcpu) -> None:
    """INT3 (CC): raise #BP with RIP past the instruction, as the CPU does for a trap."""
    _advance(vcpu, 1)
    inject_exception(vcpu, BP_VECTOR)


def fwait(vcpu: Vcpu) -> None:
    """FWAIT (9B): raise #MF if an unmasked x87 exception is pending, else do nothing."""
    fpu = vcpu.get_fpu()
    if fpu.fsw & ~fpu.fcw & X87_EXCEPTION_FLAGS:
        inject_exception(vcpu, MF_VECTOR)
    else:
        _advance(vcpu, 1)


@dataclass(frozen=True)
class Fallback:
    name: str
    opcode: bytes
    handle: Callable[[Vcpu], None]


FALLBACKS: tuple[Fallback, ...] = (
    Fallback("int3", b"\xcc", int3),
    Fallback("fwait", b"\x9b", fwait),
)


class EmulationFallbacks:
    """Dispatch an emulation failure to the matching row of `FALLBACKS`, counting each."""

    def __init__(self, table: tuple[Fallback, ...] = FALLBACKS) -> None:
        self.table = table
        self.counts = Counter[str]()

    def handle(self, vcpu: Vcpu, insn: bytes) -> bool:
        for row in self.table:
            if insn.startswith(row.opcode):
                row.handle(vcpu)
                self.counts[row.name] += 1
                return True
        return False
