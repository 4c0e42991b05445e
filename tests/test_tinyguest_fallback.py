"""Emulation fallbacks (minivmm/fallback.py), through real guests with a real IDT.

On hardware KVM `int3` and `fwait` run natively; on kvm_pvm (a software KVM that emulates
guest kernel-mode code) they stop with KVM_EXIT_INTERNAL_ERROR and minivmm reproduces them.
Either way the guest must see the architectural result: #BP with the saved RIP past the CC,
FWAIT a no-op unless an unmasked x87 exception is pending, then #MF with the saved RIP at the
FWAIT. `EmulationFallbacks.counts` says which path was taken: it must match the host.

kvm_pvm cannot emulate x87 arithmetic or FLDCW in guest kernel mode (they end the run with an
internal error, see the last test), so the pending exception is set up the way a context
switch restores one: FXRSTOR of an image whose status word holds an unmasked ZE — exactly
what `fldcw` (ZE unmasked) + `fdiv` by zero would leave — which both hosts execute.
"""

# ruff: noqa: F811  (test functions take the imported fixtures as parameters)
from __future__ import annotations

import struct
from pathlib import Path

from minivmm.boot.entry import BOOT_CS
from tinyguest import kick_handler, make_guest  # noqa: F401  (pytest fixtures, used by name)
from tinyguest import (
    CODE,
    DATA,
    IDT,
    RESULTS,
    Asm,
    fxsave_image,
)

ON_PVM = Path("/sys/module/kvm_pvm").exists()
BP_HANDLER = CODE + 0x800
MF_HANDLER = CODE + 0x900
IDTR = DATA + 0x200  # 10-byte IDTR image (DATA holds the 512-byte FXSAVE image)
SAVED_RIP, SAVED_CS, SAVED_RFLAGS, AFTER = RESULTS, RESULTS + 8, RESULTS + 16, RESULTS + 24
CR0_NE = 1 << 5
FCW_DEFAULT = 0x037F  # FNINIT: all six exceptions masked
FCW_ZE_UNMASKED = 0x037B
FSW_ZE, FSW_ES = 1 << 2, 1 << 7


def expected_fallbacks(**counts: int) -> dict[str, int]:
    """What EmulationFallbacks.counts must be: the given counts on kvm_pvm, nothing on hardware."""
    return counts if ON_PVM else {}


def recording_handler(vector: int) -> bytes:
    """A 64-bit exception handler for an exception without error code: it stores the frame
    (RIP, CS, RFLAGS) at RESULTS and ends the guest with AL = vector."""
    h = Asm(64)
    h.pop_acc()  # pop rax                (saved RIP)
    h.store_acc(SAVED_RIP, 8)  # mov [SAVED_RIP], rax
    h.pop_acc()  # pop rax                (saved CS)
    h.store_acc(SAVED_CS, 8)  # mov [SAVED_CS], rax
    h.pop_acc()  # pop rax                (saved RFLAGS)
    h.store_acc(SAVED_RFLAGS, 8)  # mov [SAVED_RFLAGS], rax
    h.mov_acc_imm(1, vector)  # mov al, vector
    h.done()  # out 0xf4, al
    return bytes(h)


def idt_guest(make_guest, bp_handler: bytes | None = None):
    """A long-mode guest with CR0.NE, the CPUID KVM supports (FXSR) and a 64-bit IDT with
    gates for #BP and #MF; returns (guest, program) with the program's `lidt` emitted."""
    g = make_guest(long_mode=True)
    g.set_cpuid()
    g.set_cr0_bits(CR0_NE)
    limit = g.write_idt64({3: BP_HANDLER, 16: MF_HANDLER})
    g.mem.write(IDTR, struct.pack("<HQ", limit, IDT))
    g.mem.write(BP_HANDLER, bp_handler or recording_handler(3))
    g.mem.write(MF_HANDLER, recording_handler(16))
    a = Asm(64)
    a.lidt_abs(IDTR)  # lidt [IDTR]
    return g, a


def test_int3_raises_bp_with_rip_after_the_cc(make_guest) -> None:
    g, a = idt_guest(make_guest)
    a.int3()  # int3
    after = a.addr
    a.mov_acc_imm(1, 0x77)  # mov al, 0x77           (not reached: the handler ends the guest)
    a.store_acc(AFTER, 1)  # mov [AFTER], al
    a.done()  # out 0xf4, al
    g.run_ok(a)
    assert g.done.value == 3  # the #BP handler ran
    assert g.mem.read_int(SAVED_RIP, 8) == after  # a trap: RIP past the CC
    assert g.mem.read_int(SAVED_CS, 8) == BOOT_CS  # the product's __BOOT_CS
    assert g.mem.read_int(SAVED_RFLAGS, 8) & 0x2 == 0x2  # reserved bit 1: a real RFLAGS image
    assert g.mem.read_int(AFTER, 1) == 0
    assert g.loop.fallbacks.counts == expected_fallbacks(int3=1)
    assert g.loop.stats.by_kind == ({"internal_error": 1, "io": 1} if ON_PVM else {"io": 1})


def test_int3_handler_returns_with_iretq_and_execution_continues(make_guest) -> None:
    counter = RESULTS + 32
    h = Asm(64)
    h.inc_byte_abs(counter)  # inc byte [counter]
    h.iretq()  # iretq
    g, a = idt_guest(make_guest, bp_handler=bytes(h))
    a.int3()  # int3
    a.int3()  # int3
    a.mov_acc_imm(1, 0x55)  # mov al, 0x55
    a.store_acc(AFTER, 1)  # mov [AFTER], al
    a.done()  # out 0xf4, al
    g.run_ok(a)
    assert g.mem.read_int(counter, 1) == 2
    assert g.mem.read_int(AFTER, 1) == 0x55
    assert g.loop.fallbacks.counts == expected_fallbacks(int3=2)


def test_int3_in_real_mode_goes_through_the_ivt(make_guest) -> None:
    """Real-mode INT3 is emulated by both hosts (kvm_pvm too): no fallback is needed."""
    g = make_guest(long_mode=False)
    g.mem.write(3 * 4, struct.pack("<HH", 0x800, CODE >> 4))  # IVT[3] = 1000:0800
    h = Asm(16)
    h.pop_acc()  # pop ax                 (saved IP)
    h.store_acc(RESULTS, 2)  # mov [RESULTS], ax
    h.pop_acc()  # pop ax                 (saved CS)
    h.store_acc(RESULTS + 2, 2)  # mov [RESULTS+2], ax
    h.mov_acc_imm(1, 3)  # mov al, 3
    h.done()  # out 0xf4, al
    g.mem.write(CODE + 0x800, bytes(h))
    a = Asm(16)
    a.nop()  # nop
    a.int3()  # int3
    after_ip = len(a.code)
    a.done()  # out 0xf4, al
    g.run_ok(a)
    assert g.done.value == 3
    assert (g.mem.read_int(RESULTS, 2), g.mem.read_int(RESULTS + 2, 2)) == (after_ip, CODE >> 4)
    assert g.loop.fallbacks.counts == {}


def test_fwait_without_a_pending_exception_continues(make_guest) -> None:
    g, a = idt_guest(make_guest)
    a.fninit()  # fninit
    a.fwait()  # fwait                   (nothing pending: a no-op)
    a.mov_acc_imm(1, 0x55)  # mov al, 0x55
    a.store_acc(AFTER, 1)  # mov [AFTER], al
    a.done()  # out 0xf4, al
    g.run_ok(a)
    assert g.done.value == 0x55
    assert g.mem.read_int(AFTER, 1) == 0x55
    assert g.mem.read_int(SAVED_RIP, 8) == 0  # no handler ran
    assert g.loop.fallbacks.counts == expected_fallbacks(fwait=1)


def test_fwait_with_a_masked_exception_flag_continues(make_guest) -> None:
    g, a = idt_guest(make_guest)
    g.mem.write(DATA, fxsave_image(fcw=FCW_DEFAULT, fsw=FSW_ZE))  # ZE raised but masked
    a.fninit()  # fninit
    a.fxrstor_abs(DATA)  # fxrstor [DATA]
    a.fwait()  # fwait
    a.mov_acc_imm(1, 0x55)  # mov al, 0x55
    a.done()  # out 0xf4, al
    g.run_ok(a)
    assert g.done.value == 0x55
    assert g.vcpu.get_fpu().fsw & (FSW_ZE | FSW_ES) == FSW_ZE
    assert g.loop.fallbacks.counts == expected_fallbacks(fwait=1)


def test_fwait_with_an_unmasked_pending_exception_raises_mf_at_the_fwait(make_guest) -> None:
    g, a = idt_guest(make_guest)
    g.mem.write(DATA, fxsave_image(fcw=FCW_ZE_UNMASKED, fsw=FSW_ES | FSW_ZE))
    a.fninit()  # fninit
    a.fxrstor_abs(DATA)  # fxrstor [DATA]       (FCW: ZE unmasked; FSW: ZE + ES pending)
    fwait_at = a.addr
    a.fwait()  # fwait                   (#MF, a fault: saved RIP is this instruction)
    a.mov_acc_imm(1, 0x55)  # mov al, 0x55
    a.store_acc(AFTER, 1)  # mov [AFTER], al
    a.done()  # out 0xf4, al
    g.run_ok(a)
    assert g.done.value == 16  # the #MF handler ran
    assert g.mem.read_int(SAVED_RIP, 8) == fwait_at
    assert g.mem.read_int(SAVED_CS, 8) == BOOT_CS  # the product's __BOOT_CS
    assert g.mem.read_int(AFTER, 1) == 0
    fpu = g.vcpu.get_fpu()
    assert (fpu.fcw, fpu.fsw & (FSW_ES | FSW_ZE)) == (FCW_ZE_UNMASKED, FSW_ES | FSW_ZE)  # still pending
    assert g.loop.fallbacks.counts == expected_fallbacks(fwait=1)


def test_an_instruction_the_host_cannot_emulate_ends_the_run_with_a_diagnosis(make_guest) -> None:
    """kvm_pvm cannot emulate FLDCW in guest kernel mode and minivmm has no fallback for it:
    the run ends with the instruction bytes in the reason. Hardware runs it natively."""
    g, a = idt_guest(make_guest)
    g.mem.write(DATA, struct.pack("<H", FCW_ZE_UNMASKED))
    a.fninit()  # fninit
    fldcw_at = a.addr
    a.fldcw_abs(DATA)  # fldcw [DATA]
    a.done()  # out 0xf4, al
    stop = g.run(a)
    if ON_PVM:
        assert stop.status == 1, stop
        assert stop.reason.startswith(f"KVM internal error (suberror 1) at rip={fldcw_at:#x} insn=d9 2c 25 00 38 00 00")  # fldcw [DATA]
        assert g.loop.stats.by_kind == {"internal_error": 1}
    else:
        assert stop.status == 0, f"{stop}\n{g.loop.describe()}"
        assert g.vcpu.get_fpu().fcw == FCW_ZE_UNMASKED
    assert g.loop.fallbacks.counts == {}
