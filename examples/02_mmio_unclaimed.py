"""Tutorial step 2: MMIO, and what happens to accesses no device claims.

RAM is 512 KiB (0x00000-0x7ffff). A device sits at 0xa0000, in the hole above RAM where a PC
has its VGA window: the guest's loads and stores there are not RAM, so KVM exits with
KVM_EXIT_MMIO and the VMM's MMIO bus calls the device. Nothing is attached at 0xb0000, port
0x80 or port 0x81: those accesses are "unclaimed" - a write goes nowhere, a read returns all
ones, as on a PC bus with nothing answering.

Run from a minivmm checkout: PYTHONPATH=. .venv/bin/python examples/02_mmio_unclaimed.py
"""

from minivmm.api import BareVm

CODE = 0x10000
RESULTS = 0x0600  # the guest stores what it read here (RAM: no exit)

PROGRAM = bytes.fromhex(
    "b8 00 a0"  #       mov ax, 0xa000
    "8e c0"  #          mov es, ax               ES:0 is GPA 0xa0000 (ES base = 0xa000 << 4)
    "b0 2a"  #          mov al, 0x2a
    "26 a2 00 00"  #    mov [es:0x0000], al      MMIO write to the device, offset 0
    "26 a0 04 00"  #    mov al, [es:0x0004]      MMIO read from the device, offset 4
    "a2 00 06"  #       mov [0x0600], al         RAM: no exit
    "b8 00 b0"  #       mov ax, 0xb000
    "8e c0"  #          mov es, ax
    "26 a0 00 00"  #    mov al, [es:0x0000]      MMIO read at 0xb0000: nobody there
    "a2 01 06"  #       mov [0x0601], al
    "e6 80"  #          out 0x80, al             port write nobody claims
    "e4 81"  #          in al, 0x81              port read nobody claims
    "a2 02 06"  #       mov [0x0602], al
    "f4"  #             hlt
)


class Registers8:
    """Eight byte-wide registers; register n reads back as 0x10 + n until written."""

    def __init__(self) -> None:
        self.regs = [0x10 + n for n in range(8)]
        self.log: list[str] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(f"read  offset {offset} size {size} -> {self.regs[offset]:#x}")
        return self.regs[offset]

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(f"write offset {offset} size {size} value {value:#x}")
        self.regs[offset] = value


def main() -> None:
    device = Registers8()
    with BareVm(ram_size=512 << 10, irqchip=False) as vm:
        vm.load(CODE, PROGRAM)
        vm.add_mmio_device(0xA0000, 8, device, "regs8")
        vm.start_real_mode(CODE)
        vm.run(timeout=5)
        for line in device.log:
            print("device:", line)
        print(f"guest read from the device: {vm.mem.read_int(RESULTS, 1):#x}")
        print(f"guest read from unclaimed MMIO: {vm.mem.read_int(RESULTS + 1, 1):#x}")
        print(f"guest read from unclaimed port: {vm.mem.read_int(RESULTS + 2, 1):#x}")
        stats = vm.statistics()
        print("exits by kind:", dict(stats.exits_by_kind()))
        print("exits by device:", dict(stats.exits_by_device()))
        print("unclaimed:", stats.unclaimed)


if __name__ == "__main__":
    main()
