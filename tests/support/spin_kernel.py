"""A tiny PVH kernel with symbols that spins in ring 0, then in ring 3, then powers off: the
guest of the profiler's tests (tests/test_profiler.py) and overhead benchmark
(bench/profile_overhead.py). Test support, not product.

`spin_kernel` returns the code and its functions; `with_symtab` adds an ELF symbol table
(gABI "Sections", "Symbol Table") to `make_pvh_elf`'s file, `system_map` writes the same
symbols as `nm -n` would. A phase spins either for a number of TSC ticks (wall time: robust
on a busy host) or for a number of loop iterations (work: what an overhead measurement needs).
"""

from __future__ import annotations

import struct

from minivmm import layout
from minivmm.boot.acpi import S5_SLP_TYP
from minivmm.devices.acpi_pm import SLP_EN, SLP_TYP_SHIFT
from minivmm.disasm import KERNEL_MAP
from support.synthetic_kernels import ELF64_EHDR, make_pvh_elf

LOAD = 0x1000000  # make_pvh_elf's load address (physical; the symbols are at LOAD + KERNEL_MAP)
SPIN_CYCLES = 0x40000000  # TSC ticks per phase: ~0.4 s at this host's 2.6 GHz
USER_OFFSET, CODE_SIZE = 0x100, 0x140
KERNEL_STACK = LOAD + 0x1000  # in the ELF's bss
USER_STACK = LOAD + 0x800
KERNEL_CS = 0x08  # SYSEXIT's base selector (SDM vol. 2B, SYSEXIT: CS = it + 16, SS = it + 24, both RPL 3)
MSR_IA32_SYSENTER_CS = 0x174
EFLAGS_IOPL3 = 0x3000  # IOPL 3 lets ring 3 power off with OUT


def spin_loops(count: int) -> bytes:
    """32-bit code: `count` (< 2^32) iterations of dec/jnz: a fixed amount of work."""
    return b"\xb9" + struct.pack("<I", count) + b"\x49\x75\xfd"  # mov ecx, count; l: dec ecx; jnz l


def spin(cycles: int) -> bytes:
    """32-bit code: read the TSC, loop until it advanced `cycles` (< 2^32) ticks. Wall time,
    not instructions: a vCPU thread descheduled by a busy host still ends the phase on time."""
    loop = (
        b"\x0f\x31"  # rdtsc
        + b"\x29\xd8"  # sub eax, ebx
        + b"\x19\xca"  # sbb edx, ecx
        + b"\x85\xd2"  # test edx, edx
        + b"\x75\x07"  # jnz done (over cmp and jb)
        + b"\x3d" + struct.pack("<I", cycles)  # cmp eax, cycles
    )
    loop += bytes([0x72, (-(len(loop) + 2)) & 0xFF])  # jb loop
    return b"\x0f\x31\x89\xc3\x89\xd1" + loop  # rdtsc; mov ebx, eax; mov ecx, edx; loop


def spin_kernel(kernel_phase: bytes | None = None, user_phase: bytes | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The code and its functions {name: (offset, size)}: kernel_spin (ring 0, `kernel_phase`),
    enter_user (SYSEXIT to flat ring-3 segments, IOPL 3), user_spin (ring 3, `user_phase`, then
    power off). A phase is `spin` or `spin_loops` code; default SPIN_CYCLES of TSC time."""
    kernel_phase = spin(SPIN_CYCLES) if kernel_phase is None else kernel_phase
    user_phase = spin(SPIN_CYCLES) if user_phase is None else user_phase
    kernel_spin = b"\xbc" + struct.pack("<I", KERNEL_STACK) + kernel_phase  # mov esp, stack; spin
    enter_user = (  # SYSEXIT, as KVM's emulator (software KVM) can return to ring 3 with it, not with IRET
        b"\xb9" + struct.pack("<I", MSR_IA32_SYSENTER_CS)  # mov ecx, IA32_SYSENTER_CS
        + b"\xb8" + struct.pack("<I", KERNEL_CS)  # mov eax, kernel CS: SYSEXIT loads CS +16, SS +24 (RPL 3)
        + b"\x31\xd2"  # xor edx, edx
        + b"\x0f\x30"  # wrmsr
        + b"\x9c"  # pushfd
        + b"\x81\x0c\x24" + struct.pack("<I", EFLAGS_IOPL3)  # or dword [esp], IOPL 3: ring 3 may OUT
        + b"\x9d"  # popfd
        + b"\xb9" + struct.pack("<I", USER_STACK)  # mov ecx, user stack
        + b"\xba" + struct.pack("<I", LOAD + USER_OFFSET)  # mov edx, user entry
        + b"\x0f\x35"  # sysexit
    )
    user_spin = (
        user_phase
        + b"\x66\xba" + struct.pack("<H", layout.ACPI_SLEEP_CONTROL_PORT)  # mov dx, SLEEP_CONTROL
        + bytes([0xB0, (S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN, 0xEE])  # mov al, S5 | SLP_EN; out dx, al
        + b"\xeb\xfe"  # jmp $ (HLT would fault in ring 3)
    )
    code = bytearray(CODE_SIZE)
    code[0 : len(kernel_spin)] = kernel_spin
    code[len(kernel_spin) : len(kernel_spin) + len(enter_user)] = enter_user
    assert len(kernel_spin) + len(enter_user) <= USER_OFFSET and USER_OFFSET + len(user_spin) <= CODE_SIZE
    code[USER_OFFSET : USER_OFFSET + len(user_spin)] = user_spin
    functions = {
        "kernel_spin": (0, len(kernel_spin)),
        "enter_user": (len(kernel_spin), len(enter_user)),
        "user_spin": (USER_OFFSET, len(user_spin)),
    }
    return bytes(code), functions


def with_symtab(elf: bytes, symbols: dict[str, tuple[int, int]]) -> bytes:
    """`elf` with section headers for .symtab/.strtab/.shstrtab holding `symbols` (name ->
    (virtual address, size)) as STT_FUNC globals (gABI "Sections", "Symbol Table")."""
    strtab = b"\0" + b"".join(name.encode() + b"\0" for name in symbols)
    syms, pos = [bytes(24)], 1
    for name, (value, size) in symbols.items():
        syms.append(struct.pack("<IBBHQQ", pos, 0x12, 0, 0xFFF1, value, size))  # STB_GLOBAL|STT_FUNC, SHN_ABS
        pos += len(name) + 1
    symtab = b"".join(syms)
    shstrtab = b"\0.symtab\0.strtab\0.shstrtab\0"
    body = elf + bytes(-len(elf) % 8)
    sym_off = len(body)
    str_off = sym_off + len(symtab)
    shs_off = str_off + len(strtab)
    sh_off = shs_off + len(shstrtab) + (-(shs_off + len(shstrtab)) % 8)
    sh = struct.Struct("<IIQQQQIIQQ")
    headers = (
        bytes(sh.size)
        + sh.pack(1, 2, 0, 0, sym_off, len(symtab), 2, 1, 8, 24)  # .symtab, link .strtab, first global 1
        + sh.pack(9, 3, 0, 0, str_off, len(strtab), 0, 0, 1, 0)  # .strtab
        + sh.pack(17, 3, 0, 0, shs_off, len(shstrtab), 0, 0, 1, 0)  # .shstrtab
    )
    out = bytearray(body + symtab + strtab + shstrtab)
    out += bytes(sh_off - len(out)) + headers
    fields = list(ELF64_EHDR.unpack_from(out))
    fields[6], fields[11], fields[12], fields[13] = sh_off, sh.size, 4, 3  # e_shoff, e_shentsize, e_shnum, e_shstrndx
    out[: ELF64_EHDR.size] = ELF64_EHDR.pack(*fields)
    return bytes(out)


def virtual(functions: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {name: (LOAD + KERNEL_MAP + off, size) for name, (off, size) in functions.items()}


def system_map(functions: dict[str, tuple[int, int]]) -> str:
    rows = sorted((addr, name) for name, (addr, _) in virtual(functions).items())
    return "".join(f"{addr:016x} T {name}\n" for addr, name in rows) + f"{LOAD + KERNEL_MAP + CODE_SIZE:016x} B _end\n"


def spin_elf(kernel_phase: bytes | None = None, user_phase: bytes | None = None) -> bytes:
    """`spin_kernel` as a PVH vmlinux-like ELF with its functions in `.symtab`."""
    code, functions = spin_kernel(kernel_phase, user_phase)
    return with_symtab(make_pvh_elf(code), virtual(functions))
