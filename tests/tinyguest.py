"""Tiny hand-assembled guests on real KVM: a few bytes of real-mode or long-mode code run
against test devices on the real buses, through the real exit path (`VcpuLoop`).

Each guest is a `minivmm.api.BareVm` (the public API the tutorial teaches) with the tests'
conventions on top. A long-mode guest enters long mode through the product's own entry code,
as the machine boots a bzImage (`BareVm.start_long_mode`: the boot GDT and identity page
tables of `minivmm.boot.entry.setup_entry`, copied into the vCPU by `vcpu_setup.apply_entry`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from minivmm import layout
from minivmm.api import BareVm, RunTimeout, Stop
from minivmm.boot.entry import BOOT_CS, BootEntry
from minivmm.ranges import AddressRange
from minivmm.vcpu import install_kick_handler

RAM_SIZE = 2 << 20
# Below 64 KiB, so real mode reaches everything with DS=0, and clear of what the long-mode
# entry writes (layout.BOOT_GDT, layout.PAGE_TABLES): checked below.
CODE = 0x10000
DONE_PORT = 0xF4  # a write here ends the tiny guest
STACK_TOP = 0x8000  # initial RSP/SP (the stack grows down from here)
RESULTS = 0x3000  # scratch RAM where guests store what they read
DATA = 0x3800  # scratch RAM for data the host puts there before the run (rep outs source, fldcw operand...)
IDT = 0x4000  # where tests that need one put a 64-bit IDT (256 gates x 16 bytes = up to 0x4FFF)
_SCRATCH = AddressRange(RESULTS, IDT + 0x1000 - RESULTS)
assert not any(_SCRATCH.overlaps(r) for r in (layout.BOOT_GDT, layout.PAGE_TABLES, AddressRange(STACK_TOP - 0x1000, 0x1000)))
assert not any(AddressRange(CODE, 0x1000).overlaps(r) for r in (layout.BOOT_GDT, layout.PAGE_TABLES))


class Asm:
    """A tiny x86 assembler: one method per instruction, each appending its encoding.

    `bits` is 16 (real mode: 16-bit operand and address size by default) or 64 (long mode:
    32-bit operand size by default, 64-bit addresses). Methods that take a `size` (1, 2, 4 or
    8 bytes) pick the accumulator AL/AX/EAX/RAX and add the operand-size prefix (66) or REX.W
    (48) the mode needs. Each method returns `self`, so a program reads as one instruction a
    line. `addr` is the guest-linear address of the next instruction (code runs at CODE in
    both modes: in real mode CS.base is CODE and IP starts at 0).
    """

    def __init__(self, bits: int) -> None:
        if bits not in (16, 64):
            raise ValueError(f"bits must be 16 or 64, not {bits}")
        self.bits = bits
        self.code = bytearray()

    # -- plumbing ------------------------------------------------------------------------
    def emit(self, *parts: bytes | int) -> "Asm":
        for part in parts:
            self.code += bytes([part]) if isinstance(part, int) else part
        return self

    @property
    def addr(self) -> int:
        return CODE + len(self.code)

    def __bytes__(self) -> bytes:
        return bytes(self.code)

    def _osz(self, size: int) -> bytes:
        """Operand-size prefix for a 2/4/8-byte operand in this mode (none for 1 byte)."""
        if size == 1:
            return b""
        if size == 2:
            return b"\x66" if self.bits == 64 else b""
        if size == 4:
            return b"\x66" if self.bits == 16 else b""
        if size == 8 and self.bits == 64:
            return b"\x48"  # REX.W
        raise ValueError(f"no {size}-byte operand in {self.bits}-bit mode")

    def _moffs(self, addr: int) -> bytes:
        """A direct memory offset: 16 bits in real mode, 64 bits in long mode (no 67 prefix)."""
        return addr.to_bytes(2 if self.bits == 16 else 8, "little")

    def _abs(self, modrm_reg: int) -> bytes:
        """ModRM (+SIB) for an absolute [disp] operand with /reg = modrm_reg, before the disp."""
        if self.bits == 16:
            return bytes([0x06 | modrm_reg << 3])  # mod=00 rm=110: [disp16]
        return bytes([0x04 | modrm_reg << 3, 0x25])  # mod=00 rm=100, SIB base=101 index=100: [disp32]

    def _disp(self, addr: int) -> bytes:
        return addr.to_bytes(2 if self.bits == 16 else 4, "little")

    # -- moves -------------------------------------------------------------------------------
    def mov_acc_imm(self, size: int, value: int) -> "Asm":
        """mov al/ax/eax/rax, imm  (B0 ib / [66] B8 iw / [66] B8 id / 48 B8 iq)"""
        if size == 1:
            return self.emit(0xB0, value.to_bytes(1, "little"))
        return self.emit(self._osz(size), 0xB8, value.to_bytes(size, "little"))

    def mov_dx_imm(self, value: int) -> "Asm":
        """mov dx, imm16  (BA iw; 66 BA iw in long mode)"""
        return self.emit(self._osz(2), 0xBA, value.to_bytes(2, "little"))

    def _mov_reg_imm(self, opcode: int, value: int) -> "Asm":
        # real mode: mov r16, imm16; long mode: mov r32, imm32 (zero-extends into r64)
        return self.emit(opcode, value.to_bytes(2 if self.bits == 16 else 4, "little"))

    def mov_cx_imm(self, value: int) -> "Asm":
        """mov cx, imm16 (B9 iw) / mov ecx, imm32 (B9 id): the REP count"""
        return self._mov_reg_imm(0xB9, value)

    def mov_si_imm(self, value: int) -> "Asm":
        """mov si, imm16 (BE iw) / mov esi, imm32 (BE id): the OUTS source"""
        return self._mov_reg_imm(0xBE, value)

    def mov_di_imm(self, value: int) -> "Asm":
        """mov di, imm16 (BF iw) / mov edi, imm32 (BF id): the INS destination"""
        return self._mov_reg_imm(0xBF, value)

    def store_acc(self, addr: int, size: int) -> "Asm":
        """mov [moffs], al/ax/eax/rax  (A2 / [66] A3 / [66] A3 / 48 A3, then moffs16 or moffs64)"""
        return self.emit(self._osz(size), 0xA2 if size == 1 else 0xA3, self._moffs(addr))

    def load_acc(self, addr: int, size: int) -> "Asm":
        """mov al/ax/eax/rax, [moffs]  (A0 / [66] A1 / [66] A1 / 48 A1, then moffs16 or moffs64)"""
        return self.emit(self._osz(size), 0xA0 if size == 1 else 0xA1, self._moffs(addr))

    def pop_acc(self) -> "Asm":
        """pop ax (real mode) / pop rax (long mode)  (58)"""
        return self.emit(0x58)

    def push_acc(self) -> "Asm":
        """push ax (real mode) / push rax (long mode)  (50)"""
        return self.emit(0x50)

    def cmp_al_abs(self, addr: int) -> "Asm":
        """cmp al, byte [addr]  (3A /r: 3A 06 disp16 in real mode, 3A 04 25 disp32 in long mode)"""
        return self.emit(0x3A, self._abs(0), self._disp(addr))

    # -- port I/O ----------------------------------------------------------------------------
    def out_dx_acc(self, size: int) -> "Asm":
        """out dx, al/ax/eax  (EE / [66] EF)"""
        return self.emit(0xEE) if size == 1 else self.emit(self._osz(size), 0xEF)

    def in_acc_dx(self, size: int) -> "Asm":
        """in al/ax/eax, dx  (EC / [66] ED)"""
        return self.emit(0xEC) if size == 1 else self.emit(self._osz(size), 0xED)

    def out_imm8_al(self, port: int) -> "Asm":
        """out imm8, al  (E6 ib)"""
        return self.emit(0xE6, port)

    def in_al_imm8(self, port: int) -> "Asm":
        """in al, imm8  (E4 ib)"""
        return self.emit(0xE4, port)

    def cld(self) -> "Asm":
        """cld  (FC): string instructions count up"""
        return self.emit(0xFC)

    def rep_outs(self, size: int) -> "Asm":
        """rep outsb/outsw/outsd  (F3 6E / [66] F3 6F): CX/RCX elements from DS:SI/RSI to port DX"""
        return self.emit(0xF3, 0x6E) if size == 1 else self.emit(self._osz(size), 0xF3, 0x6F)

    def rep_ins(self, size: int) -> "Asm":
        """rep insb/insw/insd  (F3 6C / [66] F3 6D): CX/RCX elements from port DX to ES:DI/RDI"""
        return self.emit(0xF3, 0x6C) if size == 1 else self.emit(self._osz(size), 0xF3, 0x6D)

    def done(self) -> "Asm":
        """out 0xf4, al  (E6 F4): ends the tiny guest (DoneDevice)"""
        return self.out_imm8_al(DONE_PORT)

    # -- control flow and faults -------------------------------------------------------------
    def nop(self) -> "Asm":
        """nop  (90)"""
        return self.emit(0x90)

    def hlt(self) -> "Asm":
        """hlt  (F4)"""
        return self.emit(0xF4)

    def jmp_self(self) -> "Asm":
        """jmp $  (EB FE): spin forever"""
        return self.emit(0xEB, 0xFE)

    def jmp(self, target: int) -> "Asm":
        """jmp rel8  (EB cb)"""
        return self.emit(0xEB, self._rel8(target, "jmp"))

    def _rel8(self, target: int, what: str) -> int:
        """The rel8 byte of a 2-byte jump at `addr` to `target`."""
        rel = target - (self.addr + 2)
        if not -128 <= rel < 128:
            raise ValueError(f"{what} target {target:#x} out of rel8 range from {self.addr:#x}")
        return rel & 0xFF

    def loope(self, target: int) -> "Asm":
        """loope rel8  (E1 cb): decrement CX/RCX (flags untouched), jump to `target` while it is
        not zero and ZF=1 - a bounded wait for a compare to come out unequal"""
        return self.emit(0xE1, self._rel8(target, "loope"))

    def sti(self) -> "Asm":
        """sti  (FB): enable maskable interrupts (after the next instruction)"""
        return self.emit(0xFB)

    def int3(self) -> "Asm":
        """int3  (CC): #BP, a trap"""
        return self.emit(0xCC)

    def iretq(self) -> "Asm":
        """iretq  (48 CF): return from a long-mode interrupt handler"""
        assert self.bits == 64
        return self.emit(0x48, 0xCF)

    def inc_byte_abs(self, addr: int) -> "Asm":
        """inc byte [addr]  (FE /0: FE 06 disp16 in real mode, FE 04 25 disp32 in long mode)"""
        return self.emit(0xFE, self._abs(0), self._disp(addr))

    def ud2(self) -> "Asm":
        """ud2  (0F 0B): #UD"""
        return self.emit(0x0F, 0x0B)

    def xor_ecx_ecx(self) -> "Asm":
        """xor ecx, ecx  (31 C9; 66 31 C9 in real mode)"""
        return self.emit(self._osz(4), 0x31, 0xC9)

    def div_ecx(self) -> "Asm":
        """div ecx  (F7 F1; 66 F7 F1 in real mode): EDX:EAX / ECX"""
        return self.emit(self._osz(4), 0xF7, 0xF1)

    def lidt_abs(self, addr: int) -> "Asm":
        """lidt [addr]  (0F 01 /3: 0F 01 1E disp16 in real mode, 0F 01 1C 25 disp32 in long mode)"""
        return self.emit(0x0F, 0x01, self._abs(3), self._disp(addr))

    # -- x87 -----------------------------------------------------------------------------------
    def fxrstor_abs(self, addr: int) -> "Asm":
        """fxrstor [addr]  (0F AE /1: 0F AE 0E disp16 in real mode, 0F AE 0C 25 disp32 in long
        mode): load x87/SSE state from a 16-byte-aligned 512-byte image (needs CPUID.FXSR)"""
        return self.emit(0x0F, 0xAE, self._abs(1), self._disp(addr))

    def fninit(self) -> "Asm":
        """fninit  (DB E3): FCW=0x37F (all exceptions masked), FSW=0"""
        return self.emit(0xDB, 0xE3)

    def fldcw_abs(self, addr: int) -> "Asm":
        """fldcw [addr]  (D9 /5: D9 2E disp16 in real mode, D9 2C 25 disp32 in long mode)"""
        return self.emit(0xD9, self._abs(5), self._disp(addr))

    def fld1(self) -> "Asm":
        """fld1  (D9 E8): push +1.0"""
        return self.emit(0xD9, 0xE8)

    def fldz(self) -> "Asm":
        """fldz  (D9 EE): push +0.0"""
        return self.emit(0xD9, 0xEE)

    def fdivp(self) -> "Asm":
        """fdivp st(1), st(0)  (DE F9): st1 = st1 / st0, pop"""
        return self.emit(0xDE, 0xF9)

    def fwait(self) -> "Asm":
        """fwait  (9B): #MF if an unmasked x87 exception is pending"""
        return self.emit(0x9B)


def fxsave_image(fcw: int, fsw: int, mxcsr: int = 0x1F80) -> bytes:
    """A 512-byte FXSAVE image with the given x87 control and status words, all tags empty."""
    image = bytearray(512)
    struct.pack_into("<HH", image, 0, fcw, fsw)
    struct.pack_into("<I", image, 24, mxcsr)
    return bytes(image)


def idt64_gate(handler: int, selector: int = BOOT_CS) -> bytes:
    """A 64-bit interrupt gate (16 bytes): present, DPL 0, type 0xE, IST 0."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, 0, 0x8E, (handler >> 16) & 0xFFFF, handler >> 32, 0)


def pattern_byte(offset: int) -> int:
    """Byte `offset` of PatternDevice's register file: distinct for any 253 consecutive offsets, never 0 or 0xFF."""
    return (offset * 0x1D + 0x31) % 0xFD + 1


def pattern_value(offset: int, size: int) -> int:
    return int.from_bytes(bytes(pattern_byte(offset + i) for i in range(size)), "little")


@dataclass
class PatternDevice:
    """A bus device whose byte at every offset is `pattern_byte(offset)`: a read of any size at
    any offset returns `pattern_value(offset, size)`. Records every access in order."""

    reads: list[tuple[int, int]] = field(default_factory=list)
    writes: list[tuple[int, int, int]] = field(default_factory=list)

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return pattern_value(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


@dataclass
class SequenceDevice:
    """A bus device whose successive reads return start, start+1, ... (masked to the size),
    so a repeated read of one port (rep ins) shows every element in order; records writes."""

    start: int = 0xA0
    writes: list[tuple[int, int, int]] = field(default_factory=list)
    reads: list[tuple[int, int]] = field(default_factory=list)

    def read(self, offset: int, size: int) -> int:
        value = self.start + len(self.reads)
        self.reads.append((offset, size))
        return value & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


class DoneDevice:
    """The done port: a guest write ends the run (Stop(0, "done")) and is kept in `value`."""

    def __init__(self, vm: BareVm) -> None:
        self.vm = vm
        self.value: int | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value
        self.vm.stop(0, "done")


class TinyGuest:
    """A `minivmm.api.BareVm` with `RAM_SIZE` of RAM, the done port, and code run at CODE.

    The VM's parts are the BareVm's (`kvm`, `vm`, `vcpu`, `mem`, `pio`, `mmio`, `loop`,
    `stops`, `entry`); this class adds the tests' conventions: where code, stack and scratch
    data live, and the done port that ends a run."""

    def __init__(self, long_mode: bool = False, irqchip: bool = True) -> None:
        self.bare = BareVm(RAM_SIZE, irqchip=irqchip)
        b = self.bare
        self.kvm, self.vm, self.vcpu, self.mem, self.pio, self.mmio = b.kvm, b.vm, b.vcpu, b.mem, b.pio, b.mmio
        self.loop, self.stops = b.loop, b.stops
        self.done = DoneDevice(b)
        b.add_port_device(DONE_PORT, 1, self.done, "done")
        if long_mode:
            b.start_long_mode(CODE, STACK_TOP)  # the product's LONG64 entry (boot GDT, identity map)
        else:
            b.start_real_mode(CODE, STACK_TOP)  # code at CS:0, data at DS=0

    @property
    def entry(self) -> BootEntry | None:
        """The long-mode entry state, as applied (None in real mode)."""
        return self.bare.entry

    def set_cpuid(self) -> None:
        self.bare.set_cpuid()

    def set_cr0_bits(self, bits: int) -> None:
        sregs = self.vcpu.get_sregs()
        sregs.cr0 |= bits
        self.vcpu.set_sregs(sregs)

    def write_idt64(self, handlers: dict[int, int], base: int = IDT) -> int:
        """Write a 64-bit IDT at `base` with a gate per {vector: handler}; returns its limit
        (the guest loads it with lidt). Vectors without a handler get a not-present gate."""
        top = max(handlers)
        for vector in range(top + 1):
            gate = idt64_gate(handlers[vector]) if vector in handlers else bytes(16)
            self.mem.write(base + 16 * vector, gate)
        return 16 * (top + 1) - 1

    def run(self, code: "bytes | Asm", timeout: float = 5.0) -> Stop:
        self.bare.load(CODE, bytes(code))
        try:
            return self.bare.run(timeout)
        except RunTimeout as exc:
            raise AssertionError(f"tiny guest did not finish: {exc}") from None

    def run_ok(self, code: "bytes | Asm", timeout: float = 5.0) -> None:
        """Run and require the guest to end at the done port (a diagnosis otherwise)."""
        stop = self.run(code, timeout)
        assert stop == Stop(0, "done"), f"{stop}\n{self.loop.describe()}"

    def close(self) -> None:
        self.bare.close()


# -- pytest fixtures (import them into a test module to use them) -----------------------------
@pytest.fixture(scope="session", autouse=True)
def kick_handler() -> None:
    """A kick (SIGUSR2) must interrupt KVM_RUN, not kill pytest."""
    install_kick_handler()


@pytest.fixture
def make_guest():
    """`make_guest(long_mode=...)` -> a TinyGuest, closed (and its vCPU thread stopped) afterwards."""
    guests: list[TinyGuest] = []

    def make(**kwargs) -> TinyGuest:
        guest = TinyGuest(**kwargs)
        guests.append(guest)
        return guest

    yield make
    for guest in guests:
        guest.close()
