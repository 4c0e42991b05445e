"""`exit_handler.handle_exit` driven by synthetic exits at a stopped vCPU, on every host.

The vCPU is real (a tiny long-mode guest that never runs); each test builds the exit KVM
would have returned and checks what the handler did to the vCPU's registers and events, the
buses, and the run: so the emulation fallbacks and the internal-error diagnosis are tested on
hardware KVM too, where the guest would never produce those exits.
"""

# ruff: noqa: F811  (test functions take the imported fixtures as parameters)
from __future__ import annotations

import io

import pytest

from minivmm import kvm
from minivmm.exit_handler import ExitParts, Stop, handle_exit
from minivmm.fallback import BP_VECTOR, MF_VECTOR
from minivmm.vcpu_exit import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
)
from tinyguest import CODE, IDT, RESULTS, Asm, kick_handler, make_guest  # noqa: F401  (pytest fixtures, used by name)

EMULATION_FAILURE = InternalErrorExit(kvm.KVM_INTERNAL_ERROR_EMULATION)
FSW_ZE = 1 << 2
FCW_ZE_UNMASKED = 0x037B


class Recorder:
    """A bus device that answers reads with a sequence and records writes."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []
        self.next = 0x10

    def read(self, offset: int, size: int) -> int:
        self.next += 1
        return self.next

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


@pytest.fixture
def stopped(make_guest):
    """(guest, parts) with `code` placed at RIP = CODE by `place(code)`; the vCPU never runs."""
    g = make_guest(long_mode=True)
    parts = ExitParts(g.vcpu, g.mem, g.pio, g.mmio, g.loop.fallbacks, diagnostics=io.StringIO())
    return g, parts


def exception_injected(vcpu) -> tuple[int, int]:
    """(1, vector) when an exception will be delivered on the next entry, else (0, 0).

    KVM reports a set exception as injected or, after queueing it, as pending."""
    ev = vcpu.get_vcpu_events()
    queued = ev.exception.injected or ev.exception.pending
    return (1, ev.exception.nr) if queued else (0, 0)


def test_int3_emulation_failure_steps_over_it_and_injects_bp(stopped) -> None:
    """KVM does not report an injected soft exception (#BP) in KVM_GET_VCPU_EVENTS, so the
    guest is then run into an IDT whose #BP handler reports the vector and the saved RIP."""
    g, parts = stopped
    code = b"\xcc" + bytes(Asm(64).mov_acc_imm(1, 0xEE).done())  # reached only without the #BP
    g.mem.write(CODE, code)
    assert handle_exit(EMULATION_FAILURE, parts) is None
    assert g.vcpu.get_regs().rip == CODE + 1  # #BP is a trap: RIP past the CC
    assert parts.fallbacks.counts == {"int3": 1}
    assert [str(r) for r in parts.recent] == [f"emulation-fallback cc addr={CODE:#x} size=0 value=0x0 -> fallback"]
    assert parts.by_device == {}  # a fallback is not a device access
    handler = CODE + 0x800
    g.mem.write(handler, bytes(Asm(64).pop_acc().store_acc(RESULTS, 8).mov_acc_imm(1, BP_VECTOR).done()))
    sregs = g.vcpu.get_sregs()
    sregs.idt.base, sregs.idt.limit = IDT, g.write_idt64({BP_VECTOR: handler})
    g.vcpu.set_sregs(sregs)
    g.run_ok(code)
    assert g.done.value == BP_VECTOR
    assert g.mem.read_int(RESULTS, 8) == CODE + 1  # the frame's RIP


def test_fwait_without_a_pending_x87_exception_is_a_no_op(stopped) -> None:
    g, parts = stopped
    g.mem.write(CODE, b"\x9b\x90")
    assert handle_exit(EMULATION_FAILURE, parts) is None
    assert g.vcpu.get_regs().rip == CODE + 1
    assert exception_injected(g.vcpu) == (0, 0)
    assert parts.fallbacks.counts == {"fwait": 1}


def test_fwait_with_an_unmasked_pending_x87_exception_raises_mf_at_the_fwait(stopped) -> None:
    g, parts = stopped
    g.mem.write(CODE, b"\x9b\x90")
    fpu = g.vcpu.get_fpu()
    fpu.fcw, fpu.fsw = FCW_ZE_UNMASKED, FSW_ZE
    g.vcpu.set_fpu(fpu)
    assert handle_exit(EMULATION_FAILURE, parts) is None
    assert g.vcpu.get_regs().rip == CODE  # #MF is a fault: RIP stays at the FWAIT
    assert exception_injected(g.vcpu) == (1, MF_VECTOR)


def test_an_emulation_failure_on_another_instruction_ends_the_run_with_a_diagnosis(stopped) -> None:
    g, parts = stopped
    g.mem.write(CODE, b"\x0f\x0b\x90\x90")  # ud2
    stop = handle_exit(EMULATION_FAILURE, parts)
    assert stop is not None and stop.status == 1
    assert stop.reason.startswith(f"KVM internal error (suberror 1) at rip={CODE:#x} insn=0f 0b 90 90")
    dump = parts.diagnostics.getvalue()
    assert dump.startswith("vCPU 0:") and f"code at {CODE:#x}: 0f 0b 90 90" in dump
    assert g.vcpu.get_regs().rip == CODE and parts.fallbacks.counts == {}


def test_only_an_emulation_failure_takes_the_fallback_table(stopped) -> None:
    g, parts = stopped
    g.mem.write(CODE, b"\xcc")
    stop = handle_exit(InternalErrorExit(3, (7,)), parts)  # KVM_INTERNAL_ERROR_DELIVERY_EV
    assert stop is not None and stop.status == 1 and "suberror 3" in stop.reason
    assert g.vcpu.get_regs().rip == CODE and parts.fallbacks.counts == {}


def test_io_in_with_a_count_fills_every_element_and_out_dispatches_each(stopped) -> None:
    g, parts = stopped
    dev = Recorder()
    g.pio.register(0x500, 4, dev, "rec")
    data = bytearray(6)
    assert handle_exit(IoExit(0x502, 2, 3, False, memoryview(data)), parts) is None
    assert data == bytes.fromhex("1100 1200 1300")
    out = bytearray.fromhex("aabbccdd")
    assert handle_exit(IoExit(0x500, 2, 2, True, memoryview(out)), parts) is None
    assert dev.writes == [(0, 2, 0xBBAA), (0, 2, 0xDDCC)]
    assert parts.by_device == {"rec": 5}
    unclaimed = bytearray(4)
    handle_exit(IoExit(0x600, 4, 1, False, memoryview(unclaimed)), parts)
    assert unclaimed == b"\xff" * 4 and parts.by_device["unclaimed"] == 1


def test_mmio_read_and_write(stopped) -> None:
    g, parts = stopped
    dev = Recorder()
    g.mmio.register(0xD000_0000, 0x1000, dev, "rec")
    data = bytearray(8)
    assert handle_exit(MmioExit(0xD000_0008, 8, False, memoryview(data)), parts) is None
    assert int.from_bytes(data, "little") == 0x11
    assert handle_exit(MmioExit(0xD000_0010, 4, True, memoryview(b"\x01\x02\x03\x04")), parts) is None
    assert dev.writes == [(0x10, 4, 0x04030201)]
    assert [r.op for r in parts.recent] == ["read", "write"]


@pytest.mark.parametrize(
    ("exit", "status", "reason"),
    [
        (SystemEventExit(kvm.KVM_SYSTEM_EVENT_CRASH), 1, "guest reported a crash (KVM_SYSTEM_EVENT_CRASH)"),
        (SystemEventExit(kvm.KVM_SYSTEM_EVENT_RESET), 0, "guest system event 2"),
        (HltExit(), 0, "guest halted with interrupts off (KVM_EXIT_HLT)"),
        (FailEntryExit(0x21), 1, "KVM could not enter the guest (hardware reason 0x21)"),
    ],
)
def test_exits_that_end_the_run(stopped, exit, status: int, reason: str) -> None:
    _, parts = stopped
    assert handle_exit(exit, parts) == Stop(status, reason)


def test_a_triple_fault_and_an_unknown_exit_name_where_the_guest_was(stopped) -> None:
    g, parts = stopped
    g.mem.write(CODE, b"\xf4")
    assert handle_exit(ShutdownExit(), parts) == Stop(1, f"guest triple-faulted (KVM_EXIT_SHUTDOWN) at rip={CODE:#x} insn=f4" + " 00" * 14 + " (hlt)")
    stop = handle_exit(UnknownExit(kvm.KVM_EXIT_DEBUG, "debug"), parts)
    assert stop is not None and stop.reason.startswith(f"unexpected KVM exit debug at rip={CODE:#x}")
    assert parts.diagnostics.getvalue().count("vCPU 0:") == 2


def test_an_interrupted_run_goes_on(stopped) -> None:
    _, parts = stopped
    assert handle_exit(InterruptedExit(), parts) is None
    assert not parts.recent
