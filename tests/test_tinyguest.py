"""Tiny hand-assembled guests on real KVM: port I/O and MMIO dispatch through the real exit
path (`VcpuLoop`), exits that end a run, and a smoke test of the KVM layer.

Every guest is a few instructions written with `tinyguest.Asm` (one method per instruction,
its encoding in the method's docstring). Guests store what they read into RAM at RESULTS,
where the test checks it; they end by writing port 0xF4 (`out 0xf4, al`).
"""

# ruff: noqa: F811  (test functions take the imported fixtures as parameters)
from __future__ import annotations

import threading
import time

import pytest

from minivmm import kvm
from minivmm.exit_handler import Stop
from minivmm.vcpu_exit import InterruptedExit, VcpuExit
from support.idle import wait_until
from tinyguest import kick_handler, make_guest  # noqa: F401  (pytest fixtures, used by name)
from tinyguest import (
    CODE,
    DATA,
    RESULTS,
    Asm,
    PatternDevice,
    SequenceDevice,
    pattern_value,
)

MODES = [pytest.param(16, id="real"), pytest.param(64, id="long")]
PORT = 0x5000  # an 8-port test device: [0x5000, 0x5008)
NO_PORT = 0x6000  # nothing is registered there (nor claimed by the in-kernel irqchip)
MMIO = 0xD000_0000  # a test device above the 2 MiB of RAM, inside the identity map
NO_MMIO = 0xE000_0000  # nothing there
ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


def ram(guest, addr: int, size: int) -> int:
    return guest.mem.read_int(addr, size)


# -- 1. port I/O ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", MODES)
def test_pio_out_and_in_of_1_2_4_bytes(make_guest, bits: int) -> None:
    g = make_guest(long_mode=bits == 64)
    dev = PatternDevice()
    g.pio.register(PORT, 8, dev, "regs")
    a = Asm(bits)
    a.mov_dx_imm(PORT)  # mov dx, 0x5000
    a.mov_acc_imm(1, 0x5A)  # mov al, 0x5a
    a.out_dx_acc(1)  # out dx, al
    a.mov_dx_imm(PORT + 2)  # mov dx, 0x5002
    a.mov_acc_imm(2, 0xBEEF)  # mov ax, 0xbeef
    a.out_dx_acc(2)  # out dx, ax
    a.mov_dx_imm(PORT + 4)  # mov dx, 0x5004
    a.mov_acc_imm(4, 0xDEAD_BEEF)  # mov eax, 0xdeadbeef
    a.out_dx_acc(4)  # out dx, eax
    a.mov_dx_imm(PORT + 1)  # mov dx, 0x5001
    a.in_acc_dx(1)  # in al, dx
    a.store_acc(RESULTS, 1)  # mov [RESULTS], al
    a.mov_dx_imm(PORT + 3)  # mov dx, 0x5003      (an odd offset inside the range)
    a.in_acc_dx(2)  # in ax, dx
    a.store_acc(RESULTS + 2, 2)  # mov [RESULTS+2], ax
    a.mov_dx_imm(PORT + 4)  # mov dx, 0x5004
    a.in_acc_dx(4)  # in eax, dx
    a.store_acc(RESULTS + 4, 4)  # mov [RESULTS+4], eax
    a.done()  # out 0xf4, al
    g.run_ok(a)

    assert dev.writes == [(0, 1, 0x5A), (2, 2, 0xBEEF), (4, 4, 0xDEAD_BEEF)]
    assert dev.reads == [(1, 1), (3, 2), (4, 4)]
    assert ram(g, RESULTS, 1) == pattern_value(1, 1)
    assert ram(g, RESULTS + 2, 2) == pattern_value(3, 2)
    assert ram(g, RESULTS + 4, 4) == pattern_value(4, 4)
    assert g.loop.stats.by_kind == {"io": 7}
    assert g.loop.stats.by_device == {"regs": 6, "done": 1}
    assert g.pio.hits == {"regs": 6, "done": 1}
    assert not g.pio.unclaimed


@pytest.mark.parametrize("bits", MODES)
def test_pio_imm8_port_forms(make_guest, bits: int) -> None:
    g = make_guest(long_mode=bits == 64)
    dev = PatternDevice()
    g.pio.register(0xE0, 4, dev, "low")  # ports 0xe0-0xe3, reachable by the imm8 forms
    a = Asm(bits)
    a.mov_acc_imm(1, 0xC3)  # mov al, 0xc3
    a.out_imm8_al(0xE2)  # out 0xe2, al
    a.in_al_imm8(0xE1)  # in al, 0xe1
    a.store_acc(RESULTS, 1)  # mov [RESULTS], al
    a.done()  # out 0xf4, al
    g.run_ok(a)
    assert dev.writes == [(2, 1, 0xC3)] and dev.reads == [(1, 1)]
    assert ram(g, RESULTS, 1) == pattern_value(1, 1)
    assert g.done.value == pattern_value(1, 1)  # AL still holds what the device returned


@pytest.mark.parametrize("size", [1, 2, 4], ids=["b", "w", "d"])
@pytest.mark.parametrize("bits", MODES)
def test_pio_rep_outs_and_rep_ins(make_guest, bits: int, size: int) -> None:
    """String I/O: one exit may carry `count` > 1 elements (KVM reads INS data ahead; it
    sends OUTS one element an exit), each `size` bytes of the shared data area."""
    g = make_guest(long_mode=bits == 64)
    seq = SequenceDevice(start=0xA0A1A2A3 & ((1 << (8 * size)) - 1))
    counts: list[tuple[str, int]] = []  # (op, kvm_run.io.count) at every element

    class Observed:
        def read(self, offset: int, size: int) -> int:
            counts.append(("in", g.vcpu.kvm_run.io.count))
            return seq.read(offset, size)

        def write(self, offset: int, size: int, value: int) -> None:
            counts.append(("out", g.vcpu.kvm_run.io.count))
            seq.write(offset, size, value)

    g.pio.register(PORT, 8, Observed(), "seq")
    message = b"hello, tiny world, from a rep outs"[: 5 * size]  # 5 elements
    g.mem.write(DATA, message)
    n_in = 20  # elements
    a = Asm(bits)
    a.cld()  # cld
    a.mov_dx_imm(PORT + 4)  # mov dx, 0x5004
    a.mov_si_imm(DATA)  # mov si/esi, DATA
    a.mov_cx_imm(5)  # mov cx/ecx, 5
    a.rep_outs(size)  # rep outsb/outsw/outsd
    a.mov_di_imm(RESULTS)  # mov di/edi, RESULTS
    a.mov_cx_imm(n_in)  # mov cx/ecx, 20
    a.rep_ins(size)  # rep insb/insw/insd
    a.done()  # out 0xf4, al
    g.run_ok(a)

    elements = [int.from_bytes(message[i : i + size], "little") for i in range(0, len(message), size)]
    assert seq.writes == [(4, size, v) for v in elements]
    assert seq.reads == [(4, size)] * n_in
    mask = (1 << (8 * size)) - 1
    stored = g.mem.read(RESULTS, n_in * size)
    assert [int.from_bytes(stored[i : i + size], "little") for i in range(0, len(stored), size)] == [
        (seq.start + i) & mask for i in range(n_in)
    ]
    assert ram(g, RESULTS + n_in * size, 1) == 0  # not one byte more
    assert g.loop.stats.by_device == {"seq": 5 + n_in, "done": 1}
    in_counts = [c for op, c in counts if op == "in"]
    out_counts = [c for op, c in counts if op == "out"]
    assert max(in_counts) > 1, f"every INS element came in its own exit: {counts}"
    # by_kind counts exits, by_device elements: an exit of count n is n elements
    assert g.loop.stats.by_kind == {"io": _exits(out_counts) + _exits(in_counts) + 1}


def _exits(counts) -> int:
    """Number of exits, given the io.count seen at each element (an exit of count n shows n times)."""
    counts, exits, i = list(counts), 0, 0
    while i < len(counts):
        exits += 1
        i += counts[i]
    return exits


@pytest.mark.parametrize("bits", MODES)
def test_pio_unclaimed_reads_are_all_ones_and_writes_dropped(make_guest, bits: int) -> None:
    g = make_guest(long_mode=bits == 64)
    dev = PatternDevice()
    g.pio.register(PORT, 8, dev, "regs")
    g.mem.write(RESULTS, bytes(16))
    a = Asm(bits)
    a.mov_dx_imm(NO_PORT)  # mov dx, 0x6000
    a.in_acc_dx(1)  # in al, dx
    a.store_acc(RESULTS, 1)  # mov [RESULTS], al
    a.mov_acc_imm(4, 0)  # mov eax, 0
    a.in_acc_dx(2)  # in ax, dx
    a.store_acc(RESULTS + 2, 2)  # mov [RESULTS+2], ax
    a.mov_acc_imm(4, 0)  # mov eax, 0
    a.in_acc_dx(4)  # in eax, dx
    a.store_acc(RESULTS + 4, 4)  # mov [RESULTS+4], eax
    a.mov_acc_imm(4, 0x1234_5678)  # mov eax, 0x12345678
    a.out_dx_acc(1)  # out dx, al
    a.out_dx_acc(2)  # out dx, ax
    a.out_dx_acc(4)  # out dx, eax
    a.mov_dx_imm(PORT + 6)  # mov dx, 0x5006      (4 bytes from offset 6 run past the device)
    a.mov_acc_imm(4, 0)  # mov eax, 0
    a.in_acc_dx(4)  # in eax, dx
    a.store_acc(RESULTS + 8, 4)  # mov [RESULTS+8], eax
    a.done()  # out 0xf4, al
    g.run_ok(a)

    assert ram(g, RESULTS, 1) == 0xFF
    assert ram(g, RESULTS + 2, 2) == 0xFFFF
    assert ram(g, RESULTS + 4, 4) == 0xFFFF_FFFF
    assert ram(g, RESULTS + 8, 4) == 0xFFFF_FFFF
    assert (dev.reads, dev.writes) == ([], [])
    assert g.pio.unclaimed == {"read": 4, "write": 3}
    assert g.loop.stats.by_device == {"unclaimed": 7, "done": 1}
    assert g.loop.stats.by_kind == {"io": 8}


# -- 2. MMIO -------------------------------------------------------------------------------------
def test_mmio_reads_and_writes_of_1_2_4_8_bytes(make_guest) -> None:
    g = make_guest(long_mode=True)
    dev = PatternDevice()
    g.mmio.register(MMIO, 0x1000, dev, "regs")
    g.mem.write(RESULTS, b"\xcc" * 64)  # sentinel: a store of the wrong size shows
    a = Asm(64)
    a.mov_acc_imm(1, 0xAB)  # mov al, 0xab
    a.store_acc(MMIO + 1, 1)  # mov [MMIO+1], al              (A2 moffs64)
    a.mov_acc_imm(2, 0xBEEF)  # mov ax, 0xbeef
    a.store_acc(MMIO + 3, 2)  # mov [MMIO+3], ax              (66 A3 moffs64)
    a.mov_acc_imm(4, 0xDEAD_BEEF)  # mov eax, 0xdeadbeef
    a.store_acc(MMIO + 6, 4)  # mov [MMIO+6], eax             (A3 moffs64)
    a.mov_acc_imm(8, 0x0123_4567_89AB_CDEF)  # mov rax, 0x0123456789abcdef
    a.store_acc(MMIO + 0x10, 8)  # mov [MMIO+0x10], rax      (48 A3 moffs64)
    a.store_acc(MMIO + 0x1B, 8)  # mov [MMIO+0x1b], rax      (unaligned)
    a.load_acc(MMIO + 0x21, 1)  # mov al, [MMIO+0x21]        (A0 moffs64)
    a.store_acc(RESULTS, 1)  # mov [RESULTS], al
    a.load_acc(MMIO + 0x23, 2)  # mov ax, [MMIO+0x23]        (66 A1 moffs64)
    a.store_acc(RESULTS + 8, 2)  # mov [RESULTS+8], ax
    a.load_acc(MMIO + 0x25, 4)  # mov eax, [MMIO+0x25]       (A1 moffs64)
    a.store_acc(RESULTS + 16, 4)  # mov [RESULTS+16], eax
    a.load_acc(MMIO + 0x29, 8)  # mov rax, [MMIO+0x29]       (48 A1 moffs64)
    a.store_acc(RESULTS + 24, 8)  # mov [RESULTS+24], rax
    a.load_acc(MMIO + 0x40, 8)  # mov rax, [MMIO+0x40]       (aligned)
    a.store_acc(RESULTS + 32, 8)  # mov [RESULTS+32], rax
    a.done()  # out 0xf4, al
    g.run_ok(a)

    assert dev.writes == [
        (0x01, 1, 0xAB),
        (0x03, 2, 0xBEEF),
        (0x06, 4, 0xDEAD_BEEF),
        (0x10, 8, 0x0123_4567_89AB_CDEF),
        (0x1B, 8, 0x0123_4567_89AB_CDEF),
    ]
    assert dev.reads == [(0x21, 1), (0x23, 2), (0x25, 4), (0x29, 8), (0x40, 8)]
    assert ram(g, RESULTS, 8) == 0xCCCC_CCCC_CCCC_CC00 | pattern_value(0x21, 1)
    assert ram(g, RESULTS + 8, 8) == 0xCCCC_CCCC_CCCC_0000 | pattern_value(0x23, 2)
    assert ram(g, RESULTS + 16, 8) == 0xCCCC_CCCC_0000_0000 | pattern_value(0x25, 4)
    assert ram(g, RESULTS + 24, 8) == pattern_value(0x29, 8)
    assert ram(g, RESULTS + 32, 8) == pattern_value(0x40, 8)
    assert g.loop.stats.by_kind == {"mmio": 10, "io": 1}
    assert g.loop.stats.by_device == {"regs": 10, "done": 1}
    assert g.mmio.hits == {"regs": 10}
    assert not g.mmio.unclaimed


def test_mmio_unclaimed_reads_are_all_ones_and_writes_dropped(make_guest) -> None:
    g = make_guest(long_mode=True)
    dev = PatternDevice()
    g.mmio.register(MMIO, 0x1000, dev, "regs")
    a = Asm(64)
    for i, size in enumerate((1, 2, 4, 8)):
        a.mov_acc_imm(8, 0)  # mov rax, 0
        a.load_acc(NO_MMIO + i, size)  # mov al/ax/eax/rax, [NO_MMIO+i]
        a.store_acc(RESULTS + 8 * i, size)  # mov [RESULTS+8i], al/ax/eax/rax
    a.mov_acc_imm(8, 0x1111_2222_3333_4444)  # mov rax, 0x1111222233334444
    a.store_acc(NO_MMIO, 8)  # mov [NO_MMIO], rax          (dropped)
    a.store_acc(NO_MMIO + 0x11, 2)  # mov [NO_MMIO+0x11], ax  (dropped)
    a.store_acc(MMIO + 0xFFC, 4)  # mov [MMIO+0xffc], eax    (claimed: the last 4 bytes)
    a.done()  # out 0xf4, al
    g.run_ok(a)

    for i, size in enumerate((1, 2, 4, 8)):
        assert ram(g, RESULTS + 8 * i, size) == ONES[size], f"{size}-byte unclaimed read"
    assert dev.reads == [] and dev.writes == [(0xFFC, 4, 0x3333_4444)]
    assert g.mmio.unclaimed == {"read": 4, "write": 2}
    assert g.loop.stats.by_device == {"unclaimed": 6, "regs": 1, "done": 1}
    assert g.loop.stats.by_kind == {"mmio": 7, "io": 1}


def test_mmio_access_across_a_page_boundary_is_split_by_kvm(make_guest) -> None:
    """KVM splits an access that crosses a 4 KiB page into one exit per page, so a device can
    see sizes other than 1/2/4/8 (here 3 + 5); a split half past the device end is unclaimed."""
    g = make_guest(long_mode=True)
    dev = PatternDevice()
    g.mmio.register(MMIO, 0x2000, dev, "regs")
    a = Asm(64)
    a.mov_acc_imm(8, 0x8877_6655_4433_2211)  # mov rax, 0x8877665544332211
    a.store_acc(MMIO + 0xFFD, 8)  # mov [MMIO+0xffd], rax     (3 bytes in page 0, 5 in page 1)
    a.load_acc(MMIO + 0xFFE, 4)  # mov eax, [MMIO+0xffe]      (2 + 2)
    a.store_acc(RESULTS, 4)  # mov [RESULTS], eax
    a.load_acc(MMIO + 0x1FFC, 8)  # mov rax, [MMIO+0x1ffc]    (4 claimed + 4 past the end)
    a.store_acc(RESULTS + 8, 8)  # mov [RESULTS+8], rax
    a.done()  # out 0xf4, al
    g.run_ok(a)

    assert dev.writes == [(0xFFD, 3, 0x33_2211), (0x1000, 5, 0x88_7766_5544)]
    assert dev.reads == [(0xFFE, 2), (0x1000, 2), (0x1FFC, 4)]
    assert ram(g, RESULTS, 4) == pattern_value(0xFFE, 4)
    assert ram(g, RESULTS + 8, 8) == 0xFFFF_FFFF_0000_0000 | pattern_value(0x1FFC, 4)
    assert g.loop.stats.by_kind == {"mmio": 6, "io": 1}
    assert g.loop.stats.by_device == {"regs": 5, "unclaimed": 1, "done": 1}
    assert g.mmio.unclaimed == {"read": 1}


# -- 5. exits that end a run ---------------------------------------------------------------------
def test_triple_fault_ends_the_run(make_guest) -> None:
    g = make_guest(long_mode=True)
    g.mem.write(DATA, bytes(10))  # IDTR image: limit 0, base 0
    a = Asm(64)
    a.lidt_abs(DATA)  # lidt [DATA]      (an empty IDT)
    a.ud2()  # ud2                       (#UD -> #GP -> #DF -> shutdown)
    a.done()  # out 0xf4, al             (never reached)
    stop = g.run(a)
    assert stop.status == 1 and "triple" in stop.reason, stop
    assert g.done.value is None
    assert g.loop.stats.by_kind == {"shutdown": 1}


def test_divide_error_without_an_idt_triple_faults(make_guest) -> None:
    g = make_guest(long_mode=True)  # IDTR of the entry state: base 0, limit 0: no gate
    a = Asm(64)
    a.xor_ecx_ecx()  # xor ecx, ecx
    a.div_ecx()  # div ecx                (#DE -> #NP -> #DF -> shutdown)
    a.done()  # out 0xf4, al
    stop = g.run(a)
    assert stop.status == 1 and "triple" in stop.reason, stop
    assert g.done.value is None


@pytest.mark.parametrize("bits", MODES)
def test_hlt_without_an_in_kernel_irqchip_ends_the_run(make_guest, bits: int) -> None:
    g = make_guest(long_mode=bits == 64, irqchip=False)  # with an irqchip KVM would just block
    a = Asm(bits)
    a.hlt()  # hlt
    a.done()  # out 0xf4, al          (never reached)
    stop = g.run(a)
    assert stop == Stop(0, "guest halted with interrupts off (KVM_EXIT_HLT)")
    assert g.loop.stats.by_kind == {"hlt": 1}
    assert g.done.value is None
    assert g.vcpu.get_regs().rip == (1 if bits == 16 else CODE + 1)  # past the HLT


def test_describe_shows_registers_and_the_code_at_rip(make_guest) -> None:
    g = make_guest(long_mode=True)
    a = Asm(64)
    a.mov_acc_imm(8, 0x1122_3344_5566_7788)  # mov rax, 0x1122334455667788
    a.mov_dx_imm(0x4321)  # mov dx, 0x4321
    a.done()  # out 0xf4, al
    rip = a.addr
    a.nop().nop().ud2()  # nop; nop; ud2      (not executed: RIP stops here)
    g.run_ok(a)
    text = g.loop.describe()
    for name in ("rax", "rbx", "rcx", "rdx", "rsp", "r15", "rip", "rflags", "cr0", "cr3", "efer"):
        assert f"{name}=" in text, name
    assert "rax=1122334455667788" in text
    assert f"rip={rip:016x}" in text
    assert f"code at {rip:#x}: 90 90 0f 0b" in text
    assert "io out port=0x00f4 size=1 value=0x88 -> done" in text


def test_kick_stops_a_spinning_guest_promptly(make_guest) -> None:
    g = make_guest(long_mode=True)
    a = Asm(64)
    a.inc_byte_abs(RESULTS)  # spin: inc byte [RESULTS]
    spin_jmp = a.addr
    a.jmp(CODE)  # jmp spin
    g.mem.write(CODE, bytes(a))
    g.loop.start()
    # the counter moving is the guest running, i.e. the vCPU thread inside KVM_RUN
    wait_until(lambda: g.mem.read_int(RESULTS, 1) != 0, "the guest to run")
    assert g.loop.thread.is_alive()
    assert g.loop.stats.by_kind == {}  # no exit so far: the loop has no exit in it
    t0 = time.monotonic()
    g.loop.kick()
    g.loop.thread.join(2)
    elapsed = time.monotonic() - t0
    assert not g.loop.thread.is_alive(), g.loop.describe()
    assert elapsed < 2
    assert g.loop.stats.by_kind == {"intr": 1}
    assert g.stops == []  # a kick is the VMM's decision, not a guest stop
    text = g.loop.describe()
    code = bytes(a)
    at_rip = (f"code at {CODE:#x}: {code.hex(' ')}", f"code at {spin_jmp:#x}: {code[spin_jmp - CODE :].hex(' ')}")
    assert any(where in text for where in at_rip), text  # the dump shows the spin at RIP


def test_immediate_exit_makes_kvm_run_return_as_an_intr_exit(make_guest) -> None:
    """What a kick relies on when it lands before KVM_RUN: immediate_exit=1 makes KVM_RUN
    return EINTR at once, which Vcpu.run reports as an InterruptedExit."""
    g = make_guest(long_mode=True)
    g.mem.write(CODE, bytes(Asm(64).jmp_self()))  # jmp $
    g.vcpu.set_immediate_exit(True)
    exits: list[VcpuExit] = []
    t = threading.Thread(target=lambda: exits.append(g.vcpu.run()), daemon=True)
    t.start()
    t.join(2)
    assert not t.is_alive()
    assert exits == [InterruptedExit()]
    assert g.vcpu.get_regs().rip == CODE


# -- 6. the KVM layer ----------------------------------------------------------------------------
def test_kvm_layer_smoke() -> None:
    k = kvm.Kvm()
    try:
        assert kvm._ioctl(k.fd, kvm.KVM_GET_API_VERSION) == kvm.KVM_API_VERSION == 12
        assert k.vcpu_mmap_size >= 4096
        assert all(k.check_extension(cap) for cap in kvm.REQUIRED_CAPS.values())
        cpuid = k.supported_cpuid()
        leaves = {e["function"]: e for e in cpuid}
        assert 0 in leaves and 1 in leaves
        assert leaves[0]["eax"] >= 1  # highest basic leaf
        vendor = b"".join(leaves[0][r].to_bytes(4, "little") for r in ("ebx", "edx", "ecx"))
        assert len(vendor) == 12 and vendor.isascii() and vendor.strip(), vendor

        vm = k.create_vm()
        vm.set_tss_addr(0xFFFBD000)
        vm.create_irqchip()
        vm.create_pit2()
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        assert sregs.cs.selector == 0xF000 and sregs.cr0 & 1 == 0  # reset state: real mode
        sregs.ds.base, sregs.ds.selector = 0x12340, 0x1234
        sregs.idt.limit = 0x3FF
        vcpu.set_sregs(sregs)
        again = vcpu.get_sregs()
        assert (again.ds.base, again.ds.selector, again.idt.limit) == (0x12340, 0x1234, 0x3FF)
        regs = vcpu.get_regs()
        regs.rbx = 0xFEED_FACE_CAFE_BEEF
        vcpu.set_regs(regs)
        assert vcpu.get_regs().rbx == 0xFEED_FACE_CAFE_BEEF
        vcpu.close()  # releases the kvm_run view first: closing a pinned mmap raises BufferError
        assert vcpu.run_map.closed
        vm.close()
    finally:
        k.close()
