"""Tutorial step 3: long mode through the product's own GDT and page tables.

`BareVm.start_long_mode` is the entry minivmm uses for a bzImage (64-bit boot protocol): it
writes the boot GDT (layout.BOOT_GDT) and page tables identity-mapping 4 GiB with 2 MiB pages
(layout.PAGE_TABLES) into guest RAM, and puts the vCPU in long mode with paging on. The guest
then reports its control registers to an MMIO device above RAM - reachable because the identity
map covers all of the low 4 GiB, RAM or not.

Run from a minivmm checkout: PYTHONPATH=. .venv/bin/python examples/03_long_mode.py
"""

import struct

from minivmm import layout
from minivmm.api import BareVm

CODE = 0x10000
REPORT = 0xD000_0000  # a 32-byte MMIO device: offsets 0 CR0, 8 CR3, 16 CR4, 24 EFER


def store_rax(addr: int) -> str:
    """mov [moffs64], rax  (REX.W A3, then a 64-bit absolute address)"""
    return "48 a3" + addr.to_bytes(8, "little").hex()


PROGRAM = bytes.fromhex(
    "0f 20 c0" + store_rax(REPORT)  # mov rax, cr0 ; mov [REPORT], rax
    + "0f 20 d8" + store_rax(REPORT + 8)  # mov rax, cr3 ; mov [REPORT+8], rax
    + "0f 20 e0" + store_rax(REPORT + 16)  # mov rax, cr4 ; mov [REPORT+16], rax
    + "b9 80 00 00 c0"  # mov ecx, 0xc0000080 (IA32_EFER)
    + "0f 32"  # rdmsr: edx:eax = EFER
    + "a3" + (REPORT + 24).to_bytes(8, "little").hex()  # mov [REPORT+24], eax
    + "f4"  # hlt
)

CR0_BITS = {0: "PE", 4: "ET", 31: "PG"}
CR4_BITS = {5: "PAE"}
EFER_BITS = {0: "SCE", 8: "LME", 10: "LMA", 11: "NXE"}


def bits(value: int, names: dict[int, str]) -> str:
    return " ".join(name for bit, name in names.items() if value >> bit & 1)


class Report:
    def __init__(self) -> None:
        self.values: dict[int, int] = {}

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.values[offset] = value


def main() -> None:
    report = Report()
    with BareVm(ram_size=2 << 20, irqchip=False) as vm:
        vm.load(CODE, PROGRAM)
        vm.add_mmio_device(REPORT, 32, report, "report")
        entry = vm.start_long_mode(CODE)
        r = entry.regs
        print(f"entry: {entry.mode.value} rip={r.rip:#x} rsp={r.rsp:#x} cs={entry.cs.selector:#x} (l={entry.cs.l}) ds={entry.ds.selector:#x}")
        print(f"entry: cr0={entry.cr0:#x} cr3={entry.cr3:#x} cr4={entry.cr4:#x} efer={entry.efer:#x} gdt={entry.gdt.base:#x}/{entry.gdt.limit:#x}")
        gdt = vm.mem.read(layout.BOOT_GDT.base, 0x30)
        for selector in range(0x08, 0x28, 8):
            (desc,) = struct.unpack_from("<Q", gdt, selector)
            print(f"GDT[{selector:#04x}] = {desc:#018x}")
        pml4 = vm.mem.read_int(layout.PML4_ADDR, 8)
        pdpt = [vm.mem.read_int(layout.PDPT_ADDR + 8 * i, 8) for i in range(4)]
        pde = [vm.mem.read_int(layout.PD_ADDR + 8 * i, 8) for i in range(2)]
        print(f"PML4[0] = {pml4:#x}  PDPT[0..3] = {', '.join(hex(e) for e in pdpt)}")
        print(f"PD[0] = {pde[0]:#x}  PD[1] = {pde[1]:#x}  (2 MiB pages: bit 7 PS)")
        stop = vm.run(timeout=5)
        cr0, cr3, cr4, efer = (report.values[o] for o in (0, 8, 16, 24))
        print(f"guest says CR0 = {cr0:#x} ({bits(cr0, CR0_BITS)}), CR3 = {cr3:#x}, CR4 = {cr4:#x} ({bits(cr4, CR4_BITS)})")
        print(f"guest says EFER = {efer:#x} ({bits(efer, EFER_BITS)})")
        print(f"linear {REPORT:#x} -> physical {vm.vcpu.translate(REPORT):#x} (identity map)")
        print(f"stop: {stop.reason}")
        print("exits by kind:", dict(vm.stats.by_kind))


if __name__ == "__main__":
    main()
