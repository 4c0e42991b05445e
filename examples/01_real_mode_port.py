"""Tutorial step 1: a real-mode guest writes a string to a port; a Python device prints it.

Run from a minivmm checkout: PYTHONPATH=. .venv/bin/python examples/01_real_mode_port.py
"""

from minivmm.api import BareVm

CODE = 0x10000  # where the guest's code goes: CS = 0x1000, IP = 0
TEXT = 0x0500  # where the string goes (DS = 0, so DS:SI = 0x0500)
DEBUGCON = 0xE9  # the "port e9 hack" console of Bochs and QEMU's -debugcon

# Thirteen bytes of 16-bit code: print the zero-terminated string at DS:SI, then halt.
PROGRAM = bytes.fromhex(
    "be 00 05"  # 0: mov si, 0x0500
    "ac"  #       3: lodsb            al = [ds:si], si += 1
    "84 c0"  #    4: test al, al
    "74 04"  #    6: jz 12            the terminating zero: done
    "e6 e9"  #    8: out 0xe9, al     an exit to the VMM: KVM_EXIT_IO
    "eb f7"  #   10: jmp 3
    "f4"  #      12: hlt              interrupts are off: KVM_EXIT_HLT ends the run
)


class Console:
    """A port device: the bus calls write(offset, size, value) on the vCPU thread."""

    def __init__(self) -> None:
        self.text = ""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.text += chr(value)


def main() -> None:
    console = Console()
    # No in-kernel irqchip: then HLT exits to the VMM (with one, the in-kernel LAPIC waits
    # for an interrupt instead).
    with BareVm(ram_size=1 << 20, irqchip=False) as vm:
        vm.load(CODE, PROGRAM)
        vm.load(TEXT, b"Hello from real mode!\0")
        vm.add_port_device(DEBUGCON, 1, console, "debugcon")
        vm.start_real_mode(CODE)
        stop = vm.run(timeout=5)
        regs = vm.registers()
        print(f"guest wrote: {console.text!r}")
        print(f"stop: {stop.reason}")
        print(f"ip = {regs.rip:#x} (just past the hlt), si = {regs.rsi:#x}")
        print("exits by kind:", dict(vm.stats.by_kind))
        print("exits by device:", dict(vm.stats.by_device))


if __name__ == "__main__":
    main()
