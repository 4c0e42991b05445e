"""Tutorial step 8: starting the other CPUs - INIT, SIPI, SIPI through the local APIC.

A VM with three vCPUs. Only vCPU 0, the bootstrap processor (BSP), gets an entry state; KVM
holds the application processors (APs) in wait-for-SIPI (KVM_MP_STATE_UNINITIALIZED): their
threads sit inside KVM_RUN without running an instruction. The BSP starts them the way
Linux's smpboot does (Intel SDM vol. 3, 8.4.4): it writes its local APIC's Interrupt Command
Register (ICR) with an INIT IPI, then twice a start-up IPI (SIPI) whose vector 0x20 means
"start in real mode at 0x20000". KVM's in-kernel LAPIC delivers them; each AP leaves
KVM_RUN's wait and runs the trampoline, which takes a ticket with `lock xadd`, reports it
on a port (so the exit reaches the VMM on that AP's own thread), and only then counts itself
as reported. The BSP spins until both APs reported, then ends the run. No firmware, no VMM code for SIPI: KVM does it all.

Run from a minivmm checkout: PYTHONPATH=. .venv/bin/python examples/08_second_cpu.py
"""

import threading

from minivmm.api import BareVm
from minivmm import kvm

CODE = 0x10000  # the BSP's long-mode code
TRAMPOLINE = 0x20000  # where the APs start: SIPI vector 0x20 -> CS = 0x2000, IP = 0
TICKETS = 0x500  # a 32-bit counter both kinds of code reach (identity mapped, below 64 KiB)
REPORTED = 0x504  # APs that have reported their ticket (counted after the port write)
LAPIC = 0xFEE0_0000  # the local APIC's registers (SDM vol. 3, 10.4.1)
APIC_SVR, APIC_ICR_LOW = LAPIC + 0xF0, LAPIC + 0x300
# ICR low (SDM vol. 3, 10.6.1): vector | delivery mode << 8 | level assert (1 << 14) |
# destination shorthand "all excluding self" (3 << 18), so no APIC IDs are needed.
ICR_INIT = 0b101 << 8 | 1 << 14 | 3 << 18
ICR_SIPI = 0b110 << 8 | 1 << 14 | 3 << 18 | TRAMPOLINE >> 12
PORT = 0xE0  # 0xe0: "IPIs sent" (BSP); 0xe1: a ticket (AP); 0xe2: "all APs up" (BSP)
APS = 2


def store_eax(addr: int) -> str:
    """mov [moffs64], eax  (A3, then a 64-bit absolute address)"""
    return "a3" + addr.to_bytes(8, "little").hex()


def mov_eax(value: int) -> str:
    return "b8" + value.to_bytes(4, "little").hex()


BSP = bytes.fromhex(
    mov_eax(0x1FF) + store_eax(APIC_SVR)  # LAPIC software-enabled, spurious vector 0xff
    + mov_eax(ICR_INIT) + store_eax(APIC_ICR_LOW)  # INIT: the APs go to wait-for-SIPI
    + mov_eax(ICR_SIPI) + store_eax(APIC_ICR_LOW)  # SIPI: start at 0x20000
    + mov_eax(ICR_SIPI) + store_eax(APIC_ICR_LOW)  # the second SIPI the SDM's sequence sends
    + "e6 e0"  # out 0xe0, al      "IPIs sent"
    + "8b 04 25" + REPORTED.to_bytes(4, "little").hex()  # spin: mov eax, [REPORTED]
    + f"83 f8 {APS:02x}"  # cmp eax, APS
    + "75 f4"  # jne spin
    + "e6 e2"  # out 0xe2, al      "all APs up": ends the run
)  # fmt: skip
AP_TRAMPOLINE = bytes.fromhex(
    "31 c0"  # 0: xor ax, ax       (16-bit code: CS = 0x2000, DS = 0 after SIPI)
    "8e d8"  # 2: mov ds, ax
    "66 b8 01 00 00 00"  # 4: mov eax, 1
    "f0 66 0f c1 06 00 05"  # 10: lock xadd [0x500], eax   eax = this AP's ticket
    "e6 e1"  # 17: out 0xe1, al    an exit on this AP's thread
    "f0 ff 06 04 05"  # 19: lock inc word [0x504]   reported (after the exit returned)
    "f4"  # 24: hlt               waits in KVM's LAPIC (no exit): the AP is done
    "eb fd"  # 25: jmp 24
)


class Ports:
    def __init__(self, vm: BareVm) -> None:
        self.vm = vm
        self.tickets: dict[str, int] = {}  # vCPU thread -> its ticket
        self.lock = threading.Lock()  # two AP threads may write at once

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 1:
            with self.lock:
                self.tickets[threading.current_thread().name] = value
        elif offset == 2:
            self.vm.stop(0, "all APs up")


# KVM_GET_MP_STATE's values by their names in <linux/kvm.h>, without the KVM_MP_STATE_ prefix
MP_STATES = {value: name.removeprefix("KVM_MP_STATE_") for name, value in vars(kvm).items() if name.startswith("KVM_MP_STATE_")}


def main() -> None:
    with BareVm(ram_size=2 << 20, irqchip=True, cpus=1 + APS) as vm:
        vm.load(CODE, BSP)
        vm.load(TRAMPOLINE, AP_TRAMPOLINE)
        ports = Ports(vm)
        vm.add_port_device(PORT, 3, ports, "ports")
        vm.start_long_mode(CODE)
        print("before: " + ", ".join(f"vCPU {v.index} {MP_STATES[v.get_mp_state()]}" for v in vm.vcpus))
        stop = vm.run(timeout=10)
        print(f"stop: {stop.reason}")
        print(f"tickets taken: {sorted(ports.tickets.values())}, by threads {sorted(ports.tickets)}")
        for v in vm.vcpus[1:]:  # KVM set CS from the SIPI vector; the trampoline never changes it
            print(f"vCPU {v.index}: CS base {v.get_sregs().cs.base:#x} (started by the SIPI at vector {TRAMPOLINE >> 12:#x})")
        print("ports written per vCPU:", [loop.stats.by_device["ports"] for loop in vm.loops])


if __name__ == "__main__":
    main()
