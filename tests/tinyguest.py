"""Tiny hand-assembled guests on real KVM: a few bytes of real-mode or long-mode code run
against test devices on the real buses, through the real exit path (`VcpuLoop`)."""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

from minivmm.bus import Bus
from minivmm.fallback import EmulationFallbacks
from minivmm.kvm import Kvm
from minivmm.memory import GuestMemory
from minivmm.vcpu import Stop, VcpuLoop

RAM_SIZE = 2 << 20
CODE = 0x10000  # long-mode page tables use 0x1000-0x6fff
DONE_PORT = 0xF4  # a write here ends the tiny guest


@dataclass
class RecordingDevice:
    """A bus device that records writes and answers reads with a fixed pattern."""

    pattern: int = 0x8877665544332211
    writes: list[tuple[int, int, int]] = field(default_factory=list)
    reads: list[tuple[int, int]] = field(default_factory=list)

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return (self.pattern >> (8 * offset)) & ((1 << (8 * size)) - 1) if offset < 8 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


class DoneDevice:
    def __init__(self, loop_ref: list[VcpuLoop]) -> None:
        self.loop_ref = loop_ref
        self.value: int | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value
        self.loop_ref[0]._end(0, "done")


class TinyGuest:
    """A VM with `RAM_SIZE` of RAM at 0, a PIO and an MMIO bus, and one vCPU."""

    def __init__(self, long_mode: bool = False, irqchip: bool = True) -> None:
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        self.vm.set_identity_map_addr(0xFFFBC000)
        self.vm.set_tss_addr(0xFFFBD000)
        if irqchip:
            self.vm.create_irqchip()
        self.mem = GuestMemory.anonymous(RAM_SIZE)
        region = self.mem.regions[0]
        self.vm.map_memory(0, 0, region.mapping, region.size)
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.vcpu = self.vm.create_vcpu(0)
        self.stops: list[Stop] = []
        self.loop = VcpuLoop(self.vcpu, self.mem, self.pio, self.mmio, EmulationFallbacks(), self.stops.append)
        self.done = DoneDevice([self.loop])
        self.pio.register(DONE_PORT, 1, self.done, "done")
        if long_mode:
            self._long_mode()
        else:
            self._real_mode()

    def _real_mode(self) -> None:
        sregs = self.vcpu.get_sregs()
        for seg in (sregs.ds, sregs.es, sregs.ss):
            seg.base, seg.selector = 0, 0
        sregs.cs.base, sregs.cs.selector = CODE, CODE >> 4  # code at CS:0, data at DS=0
        self.vcpu.set_sregs(sregs)
        regs = self.vcpu.get_regs()
        regs.rip, regs.rflags, regs.rsp = 0, 2, 0x8000
        self.vcpu.set_regs(regs)

    def _long_mode(self) -> None:
        pml4, pdpt, pd, gdt = 0x1000, 0x2000, 0x3000, 0x500
        self.mem.write_int(pml4, 8, pdpt | 3)
        for i in range(4 * 512):  # identity-map the first 4 GiB with 2 MiB pages (4 PDs)
            if i % 512 == 0:
                self.mem.write_int(pdpt + 8 * (i // 512), 8, (pd + 8 * i) | 3)
            self.mem.write_int(pd + 8 * i, 8, (i << 21) | 0x83)
        self.mem.write(gdt, struct.pack("<3Q", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF))
        sregs = self.vcpu.get_sregs()
        sregs.gdt.base, sregs.gdt.limit = gdt, 23
        for seg, sel, typ in ((sregs.cs, 8, 11),) + tuple((s, 16, 3) for s in (sregs.ds, sregs.es, sregs.ss)):
            seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, sel, typ
            seg.present, seg.dpl, seg.s, seg.g = 1, 0, 1, 1
            seg.l, seg.db = (1, 0) if sel == 8 else (0, 1)
        sregs.cr3 = pml4
        sregs.cr4 = 1 << 5  # PAE
        sregs.cr0 = 0x80000001  # PG | PE
        sregs.efer = (1 << 8) | (1 << 10)  # LME | LMA
        self.vcpu.set_sregs(sregs)
        regs = self.vcpu.get_regs()
        regs.rip, regs.rflags, regs.rsp = CODE, 2, 0x8000
        self.vcpu.set_regs(regs)

    def run(self, code: bytes, timeout: float = 5.0) -> Stop:
        self.mem.write(CODE, code)
        self.loop.start()
        assert self.loop.thread is not None
        self.loop.thread.join(timeout)
        if self.loop.thread.is_alive():
            self.loop.kick()
            self.loop.thread.join(5)
            raise AssertionError("tiny guest did not finish:\n" + self.loop.describe())
        return self.stops[0]

    def close(self) -> None:
        self.vcpu.close()
        self.vm.close()
        self.kvm.close()
