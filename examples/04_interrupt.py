"""Tutorial step 4: an interrupt delivered through KVM's in-kernel irqchip.

The VM gets KVM's in-kernel interrupt controllers (two PICs, an IOAPIC, a local APIC per
vCPU) and one MSI route: a GSI whose routing entry is an MSI message (KVM_SET_GSI_ROUTING),
fed by an eventfd (KVM_IRQFD). A host thread - standing in for a device finishing its work -
writes the eventfd, and KVM injects the interrupt into the vCPU without the VMM's vCPU
thread doing anything: the guest, halted with interrupts on, wakes up inside KVM_RUN.

Run from a minivmm checkout: PYTHONPATH=. .venv/bin/python examples/04_interrupt.py
"""

import struct
import threading

from minivmm.api import BareVm
from minivmm.boot.entry import BOOT_CS

CODE = 0x10000
HANDLER = CODE + 0x100
IDT = 0x4000
IDTR = 0x3800  # the 10-byte operand of lidt: limit, base
VECTOR = 0x40
LAPIC = 0xFEE0_0000  # the local APIC's registers (Intel SDM vol. 3, 10.4.1)
APIC_SVR, APIC_EOI = LAPIC + 0xF0, LAPIC + 0xB0
MSI_ADDRESS = LAPIC | 0 << 12  # fixed delivery to APIC ID 0 (SDM vol. 3, 10.11.1)
PORT = 0xE0  # 0xe0 "ready", 0xe1 "in the handler", 0xe2 "woke up"


def store_eax(addr: int) -> str:
    """mov [moffs64], eax  (A3, then a 64-bit absolute address)"""
    return "a3" + addr.to_bytes(8, "little").hex()


MAIN = bytes.fromhex(
    "0f 01 1c 25" + IDTR.to_bytes(4, "little").hex()  # lidt [IDTR]
    + "b8 ff 01 00 00" + store_eax(APIC_SVR)  # mov eax, 0x1ff ; mov [APIC_SVR], eax: LAPIC on
    + "e6 e0"  # out 0xe0, al     "ready": the host starts its device thread
    + "fb"  # sti
    + "f4"  # hlt               waits inside KVM (the in-kernel LAPIC), no exit
    + "e6 e2"  # out 0xe2, al     "woke up": ends the run
)
HANDLER_CODE = bytes.fromhex(
    "50"  # push rax
    + f"b0 {VECTOR:02x}"  # mov al, VECTOR
    + "e6 e1"  # out 0xe1, al     "in the handler"
    + "b8 00 00 00 00" + store_eax(APIC_EOI)  # mov eax, 0 ; mov [APIC_EOI], eax
    + "58"  # pop rax
    + "48 cf"  # iretq
)


def idt_gate(handler: int) -> bytes:
    """A 64-bit interrupt gate (SDM vol. 3, 6.14.1): present, DPL 0, type 0xe."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, BOOT_CS, 0, 0x8E, handler >> 16 & 0xFFFF, handler >> 32, 0)


class Ports:
    def __init__(self, vm: BareVm) -> None:
        self.vm = vm
        self.route = vm.msi_route(MSI_ADDRESS, VECTOR)
        self.events: list[str] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.events.append("guest: ready")
            # The "device" finishes later on its own thread and signals the route's eventfd.
            threading.Timer(0.05, self.route.trigger).start()
        elif offset == 1:
            self.events.append(f"guest: in the handler of vector {value:#x}")
        else:
            self.events.append("guest: woke up from hlt")
            self.vm.stop(0, "guest done")


def main() -> None:
    with BareVm(ram_size=2 << 20, irqchip=True) as vm:
        vm.load(CODE, MAIN)
        vm.load(HANDLER, HANDLER_CODE)
        vm.load(IDT + 16 * VECTOR, idt_gate(HANDLER))
        vm.load(IDTR, struct.pack("<HQ", 16 * (VECTOR + 1) - 1, IDT))
        ports = Ports(vm)
        vm.add_port_device(PORT, 3, ports, "ports")
        vm.start_long_mode(CODE)
        stop = vm.run(timeout=5)
        print(f"MSI route: GSI {ports.route.gsi} -> address {MSI_ADDRESS:#x} data {VECTOR:#x}")
        print(*ports.events, sep="\n")
        print(f"stop: {stop.reason}")
        print("exits by kind:", dict(vm.stats.by_kind))


if __name__ == "__main__":
    main()
