"""The machine's MSI path on real KVM: `KvmInterrupts` / `KvmMsiRoute` (KVM_SET_GSI_ROUTING +
KVM_IRQFD) delivering to a tiny long-mode guest that counts its interrupts.

The guest has a 64-bit IDT, enables its in-kernel local APIC (SVR bit 8, Intel SDM vol. 3
10.9) and interrupts (`sti`), then repeats one step: report at a port (the host observes the
counts and acts on that exit: trigger, mask, unmask, re-route), then wait a bounded number of
iterations for its interrupt total to change. Every handler counts its vector, sends EOI and
returns. A step in which nothing must arrive is proved by the guest having spun its whole
bound with interrupts enabled (RCX = 0, RFLAGS.IF = 1 at the report): no sleep on the host.

What `tests/support/fakes.FakeMsiRoute` assumes is checked here against KVM: a masked route's
signals wait in the eventfd counter (`pending()`), and unmasking delivers them once.
"""

# ruff: noqa: F811  (test functions take the imported fixtures as parameters)
from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


from minivmm import layout
from minivmm.allocator import ResourceAllocator
from minivmm.kvm_interrupts import KvmInterrupts, KvmMsiRoute  # the product's MSI path under test
from tinyguest import kick_handler, make_guest  # noqa: F401  (pytest fixtures, used by name)
from tinyguest import CODE, DATA, IDT, RESULTS, Asm, TinyGuest

# Local APIC (Intel SDM vol. 3, 10.4.1 and table 10-1): default base, EOI and spurious-vector registers.
LAPIC_BASE = 0xFEE0_0000
APIC_EOI = LAPIC_BASE + 0xB0
APIC_SVR = LAPIC_BASE + 0xF0
APIC_SVR_ENABLE = 1 << 8
SPURIOUS_VECTOR = 0xFF


def msi_address(dest_apic_id: int) -> int:
    """MSI address for fixed delivery to one APIC in physical mode (SDM vol. 3, 10.11.1)."""
    return LAPIC_BASE | dest_apic_id << 12


VEC_A, VEC_B = 0x40, 0x41  # MSI data = vector: fixed delivery, edge (SDM vol. 3, 10.11.2)
COUNT = {VEC_A: RESULTS, VEC_B: RESULTS + 1}  # interrupts seen per vector (bytes)
TOTAL = RESULTS + 2  # interrupts seen on any vector: what the bounded wait watches
IDTR = DATA  # the 10-byte operand of lidt
HANDLERS = {VEC_A: CODE + 0x800, VEC_B: CODE + 0x880}
REPORT_PORT = 0xE0  # the guest's "observe now" port
# Bounds of the guest's wait, in loop iterations. An interrupt that is due is taken within the
# first iteration (measured on kvm_pvm, also after an unmask, which KVM injects from a work
# item), so QUIET_SPIN - 65536 iterations, ~0.3 s on kvm_pvm - is orders of magnitude past the
# delivery time. A wait for an interrupt that must come is unbounded in practice: the harness's
# timeout fails it.
QUIET_SPIN = 1 << 16
UNTIL_INTERRUPT = 0xFFFF_FFFF
RFLAGS_IF = 1 << 9


def counting_handler(vector: int) -> bytes:
    """Count the interrupt (per vector and in total), EOI the local APIC, return. RAX is kept:
    the interrupted wait compares AL with the total."""
    h = Asm(64)
    h.push_acc()  # push rax
    h.inc_byte_abs(COUNT[vector])  # inc byte [COUNT[vector]]
    h.inc_byte_abs(TOTAL)  # inc byte [TOTAL]
    h.mov_acc_imm(4, 0)  # mov eax, 0
    h.store_acc(APIC_EOI, 4)  # mov [APIC_EOI], eax      (moffs64: 0xFEE000B0 is no disp32)
    h.pop_acc()  # pop rax
    h.iretq()  # iretq
    return bytes(h)


@dataclass(frozen=True)
class Step:
    """What the host does at a report, and whether the guest must then see an interrupt
    (it waits for one) or not (it spins QUIET_SPIN iterations, watching for one)."""

    action: Callable[[], None]
    delivers: bool


def counting_program(steps: list[Step]) -> Asm:
    """Set up the IDT and the LAPIC, enable interrupts, then per step: report, wait for TOTAL
    to change (bounded by the step's kind). Ends with a last report and the done port."""
    a = Asm(64)
    a.lidt_abs(IDTR)  # lidt [IDTR]
    a.mov_acc_imm(4, APIC_SVR_ENABLE | SPURIOUS_VECTOR)  # mov eax, 0x1ff
    a.store_acc(APIC_SVR, 4)  # mov [APIC_SVR], eax    (software-enable the LAPIC)
    a.sti()  # sti
    for step in steps:
        a.load_acc(TOTAL, 1)  # mov al, [TOTAL]
        a.out_imm8_al(REPORT_PORT)  # out REPORT_PORT, al       (the host acts on this exit)
        a.mov_cx_imm(UNTIL_INTERRUPT if step.delivers else QUIET_SPIN)  # mov ecx, bound
        wait = a.addr
        a.cmp_al_abs(TOTAL)  # cmp al, [TOTAL]
        a.loope(wait)  # loope wait                (rcx--, again while unchanged)
    a.load_acc(TOTAL, 1)  # mov al, [TOTAL]
    a.out_imm8_al(REPORT_PORT)  # out REPORT_PORT, al
    a.done()  # out 0xf4, al
    return a


@dataclass(frozen=True)
class Observation:
    """What the host saw at one report: the guest's counts and the route's state."""

    counts: dict[int, int]  # vector -> interrupts the guest has counted
    spin_left: int  # RCX: iterations of the last wait left (0: it ran to its bound)
    interrupts_enabled: bool  # RFLAGS.IF
    pending: bool  # route.pending()
    attached: bool  # the irqfd is attached to KVM
    eventfd_count: int  # the route's eventfd counter, read without consuming it


def eventfd_count(fd: int) -> int:
    """An eventfd's counter from /proc/self/fdinfo (proc_fdinfo(5), hexadecimal), unconsumed."""
    m = re.search(r"^eventfd-count:\s*([0-9a-f]+)$", Path(f"/proc/self/fdinfo/{fd}").read_text(), re.MULTILINE)
    assert m, f"fd {fd} is not an eventfd"
    return int(m.group(1), 16)


@dataclass
class ReportPort:
    """The host side of REPORT_PORT: at the n-th report, record an Observation, then run the
    n-th step's action (on the vCPU thread, while the guest waits in this exit)."""

    guest: TinyGuest
    route: KvmMsiRoute
    steps: list[Step]
    seen: list[Observation] = field(default_factory=list)

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        regs = self.guest.vcpu.get_regs()
        counts = {v: self.guest.mem.read_int(at, 1) for v, at in COUNT.items()}
        assert value == self.guest.mem.read_int(TOTAL, 1)
        route = self.route
        self.seen.append(
            Observation(counts, regs.rcx, bool(regs.rflags & RFLAGS_IF), route.pending(), route.attached, eventfd_count(route.eventfd))
        )
        if len(self.seen) <= len(self.steps):
            self.steps[len(self.seen) - 1].action()


def counting_guest(make_guest) -> TinyGuest:
    g = make_guest(long_mode=True)  # with the in-kernel irqchip (PIC, IOAPIC, a LAPIC per vCPU)
    limit = g.write_idt64(HANDLERS)
    g.mem.write(IDTR, struct.pack("<HQ", limit, IDT))
    for vector, at in HANDLERS.items():
        g.mem.write(at, counting_handler(vector))
    return g


def msi_route(g: TinyGuest) -> KvmMsiRoute:
    """A route from the product's KvmInterrupts, with GSIs from the machine's allocator (whose
    GSIs do not depend on the RAM size; it needs a size a machine may have)."""
    return KvmInterrupts(g.vm, ResourceAllocator(layout.MIN_MEM_SIZE).gsis).msi_route()


def run_script(g: TinyGuest, route: KvmMsiRoute, steps: list[Step]) -> list[Observation]:
    """Run the counting guest through `steps`; the observations at each report (one more than
    steps: the last one after the last wait). A step whose interrupt never comes times out."""
    port = ReportPort(g, route, steps)
    g.pio.register(REPORT_PORT, 1, port, "report")
    try:
        g.run_ok(counting_program(steps), timeout=10)
    except AssertionError as failure:  # e.g. an interrupt that never came: say after which step
        raise AssertionError(f"observations so far: {port.seen}") from failure
    assert len(port.seen) == len(steps) + 1
    for step, after in zip(steps, port.seen[1:]):
        assert after.interrupts_enabled
        # a wait ends early exactly when an interrupt came; a quiet one spun its whole bound
        assert (after.spin_left > 0) if step.delivers else (after.spin_left == 0), (step, after)
    return port.seen


def unmask_on(route: KvmMsiRoute, vector: int) -> Callable[[], None]:
    def act() -> None:
        route.set_message(msi_address(0), vector)
        route.set_masked(False)

    return act


def then(*steps: Callable[[], None]) -> Callable[[], None]:
    def act() -> None:
        for step in steps:
            step()

    return act


def nothing() -> None:
    pass


def test_msi_route_delivers_pends_while_masked_and_reroutes(make_guest) -> None:
    g = counting_guest(make_guest)
    route = msi_route(g)
    seen = run_script(
        g,
        route,
        [
            Step(then(unmask_on(route, VEC_A), route.trigger), delivers=True),  # (a) unmasked: delivered
            Step(route.trigger, delivers=True),  # one per trigger
            Step(then(lambda: route.set_masked(True), route.trigger, route.trigger), delivers=False),  # (b) held
            Step(lambda: route.set_masked(False), delivers=True),  # (c) unmasked: the held signal goes out
            Step(nothing, delivers=False),  # only once, though signalled twice
            Step(then(lambda: route.set_message(msi_address(0), VEC_B), route.trigger), delivers=True),  # (d)
        ],
    )
    assert [(o.counts[VEC_A], o.counts[VEC_B]) for o in seen] == [(0, 0), (1, 0), (2, 0), (2, 0), (3, 0), (3, 0), (3, 1)]
    # (b) while masked the irqfd is detached and both signals wait in the eventfd counter
    assert not seen[3].attached and seen[3].pending and seen[3].eventfd_count == 2
    # (c) after the unmask it is attached again and nothing pends: the held count was consumed
    assert seen[5].attached and not seen[5].pending
    assert all(o.eventfd_count == 0 for o in seen if o.attached)
    route.close()


def test_route_starts_masked_and_detached(make_guest) -> None:
    """A new route delivers nothing until it is unmasked: a trigger before that pends."""
    g = counting_guest(make_guest)
    route = msi_route(g)
    seen = run_script(
        g,
        route,
        [
            Step(then(lambda: route.set_message(msi_address(0), VEC_A), route.trigger), delivers=False),
            Step(lambda: route.set_masked(False), delivers=True),
        ],
    )
    assert [(o.counts[VEC_A], o.attached, o.pending) for o in seen] == [(0, False, False), (0, False, True), (1, True, False)]
    assert seen[1].eventfd_count == 1
    route.close()


def test_a_signal_delivered_on_unmask_does_not_pend_again(make_guest) -> None:
    """KVM_IRQFD injects a count the eventfd held before the assign without consuming it:
    the route must consume it, or a re-mask would show the delivered signal as pending and
    the next unmask would deliver it a second time."""
    g = counting_guest(make_guest)
    route = msi_route(g)
    route.set_message(msi_address(0), VEC_A)
    seen = run_script(
        g,
        route,
        [
            Step(route.trigger, delivers=False),  # held while masked
            Step(lambda: route.set_masked(False), delivers=True),  # delivered on unmask
            Step(lambda: route.set_masked(True), delivers=False),  # masked again: nothing new
            Step(lambda: route.set_masked(False), delivers=False),  # and nothing to deliver
        ],
    )
    assert [o.counts[VEC_A] for o in seen] == [0, 0, 1, 1, 1]
    assert seen[2].eventfd_count == 0  # KVM consumed what it delivered
    assert not seen[3].pending  # the PBA bit (MSI-X 6.8.2) stays clear
    route.close()
