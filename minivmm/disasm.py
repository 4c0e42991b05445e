"""Instruction bytes in words: capstone's disassembly, with the guest kernel symbol when known.

Used wherever minivmm shows guest instruction bytes (the state dump of a failing or stuck vCPU,
an emulation failure, the trace line of an MMIO exit). `KernelSymbols` reads a vmlinux's
`.symtab` (ELF gABI, "Symbol Table") with pyelftools, lazily: only a dump or a traced MMIO
exit pays for it, once. A bzImage carries no symbol table, so it has no symbols.
"""

from __future__ import annotations

import bisect
import struct
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

KERNEL_MAP = 0xFFFFFFFF80000000  # __START_KERNEL_map: a vmlinux's text runs early at physical = virtual - this

STT_NOTYPE, STT_FUNC = 0, 2  # ELF symbol types (gABI, "Symbol Table")
ELF64_SYM = struct.Struct("<IBBHQQ")  # st_name st_info st_other st_shndx st_value st_size: unpacked
# by hand, as pyelftools' per-symbol objects take seconds for a vmlinux's tens of thousands


@lru_cache(maxsize=3)
def _capstone(bits: int):  # type: ignore[no-untyped-def]
    import capstone

    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    return capstone.Cs(capstone.CS_ARCH_X86, mode)


def cpu_mode(cs_l: int, cs_db: int) -> int:
    """The code size the CPU decodes in: 64 (CS.L), 32 (CS.D) or 16 (SDM vol. 3, 3.4.5)."""
    return 64 if cs_l else 32 if cs_db else 16


def disassemble(code: bytes, address: int, bits: int = 64, count: int = 1) -> list[tuple[int, bytes, str]]:
    """Up to `count` instructions decoded from `code` at `address`: (address, bytes, "mnemonic operands")."""
    out = []
    for insn in _capstone(bits).disasm(code, address):
        out.append((insn.address, bytes(insn.bytes), f"{insn.mnemonic} {insn.op_str}".strip()))
        if len(out) == count:
            break
    return out


@dataclass
class KernelSymbols:
    """Function and object symbols of a vmlinux, sorted by address, for `lookup`."""

    addresses: list[int] = field(default_factory=list)
    entries: list[tuple[str, int]] = field(default_factory=list)  # (name, size), parallel to `addresses`

    @classmethod
    def from_elf(cls, path: Path) -> KernelSymbols | None:
        """The symbols of ELF file `path`, or None when it is no ELF or has no `.symtab`."""
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile
        from elftools.elf.sections import SymbolTableSection

        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                symtab = elf.get_section_by_name(".symtab")
                if not isinstance(symtab, SymbolTableSection) or elf.elfclass != 64 or not elf.little_endian:
                    return None
                strtab = elf.get_section(symtab["sh_link"]).data()
                rows = sorted(
                    (value, strtab[name : strtab.index(b"\0", name)].decode("ascii", "replace"), size)
                    for name, info, _, _, value, size in ELF64_SYM.iter_unpack(symtab.data())
                    if name and value and info & 0xF in (STT_NOTYPE, STT_FUNC)
                )
        except (OSError, ELFError, ValueError):
            return None
        best: dict[int, tuple[str, int]] = {}  # one name per address: the sized one (a function over its alias labels)
        for addr, name, size in rows:
            if addr not in best or size > best[addr][1]:
                best[addr] = (name, size)
        return cls(list(best), list(best.values()))

    def lookup(self, address: int) -> str | None:
        """"name+0xoff/0xsize" for `address`, or None outside every symbol. A physical address
        of early boot is tried at its kernel-map alias too; a sized symbol that contains the
        address wins over a label (size 0) less than a page before it."""
        found: list[tuple[bool, str]] = []
        for addr in (address, address + KERNEL_MAP) if address < 1 << 32 else (address,):
            i = bisect.bisect_right(self.addresses, addr) - 1
            if i < 0:
                continue
            name, size = self.entries[i]
            off = addr - self.addresses[i]
            if off < size or (size == 0 and off < 0x1000):
                found.append((size > 0, f"{name}+{off:#x}/{size:#x}"))
        return max(found, key=lambda f: f[0])[1] if found else None


class LazySymbols:
    """A vmlinux's symbols, read on first use (any thread); None for a kernel without them."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._loaded = False
        self._symbols: KernelSymbols | None = None

    def get(self) -> KernelSymbols | None:
        with self._lock:
            if not self._loaded:
                self._symbols = KernelSymbols.from_elf(self.path) if self.path is not None else None
                self._loaded = True
            return self._symbols

    def lookup(self, address: int) -> str | None:
        symbols = self.get()
        return None if symbols is None else symbols.lookup(address)


def describe_code(code: bytes, address: int, bits: int, symbols: LazySymbols | None = None, count: int = 1) -> str:
    """One line per instruction: "address <symbol>: bytes  mnemonic operands"; the raw bytes
    when capstone cannot decode them."""
    lines = []
    try:
        decoded = disassemble(code, address, bits, count)
    except ImportError:  # capstone is a dependency; a broken install still gets the bytes
        return f"{address:#x}: {code.hex(' ') or '?'}  (capstone is not installed: no disassembly)"
    for addr, raw, text in decoded:
        sym = symbols.lookup(addr) if symbols is not None else None
        where = f"{addr:#x}" + (f" <{sym}>" if sym else "")
        lines.append(f"{where}: {raw.hex(' ')}  {text}")
    if not lines:
        return f"{address:#x}: {code.hex(' ') or '?'}  (not a valid {bits}-bit instruction)"
    return "\n".join(lines)


def instruction_words(code: bytes, address: int, bits: int, symbols: LazySymbols | None = None) -> str:
    """The first instruction of `code` for a one-line message: "hlt", "mov byte ptr [rax], dl in
    vp_notify+0x12/0x30"; "not decodable" when capstone cannot (or is not installed)."""
    try:
        decoded = disassemble(code, address, bits, 1)
    except ImportError:
        return "capstone is not installed"
    if not decoded:
        return "not decodable"
    sym = symbols.lookup(address) if symbols is not None else None
    return decoded[0][2] + (f" in {sym}" if sym else "")
