"""`minivmm.interrupts`' protocols implemented on KVM's in-kernel interrupt controllers.

KVM's irqchip (two 8259 PICs and an IOAPIC) takes ISA lines with KVM_IRQ_LINE. MSI
messages are GSI routes (KVM_SET_GSI_ROUTING, which replaces the whole table, so the
default irqchip routes are rebuilt with it) fed by irqfds: a device writes an eventfd and KVM
injects the interrupt without waking any Python thread.
"""

from __future__ import annotations

import os
import threading

from . import kvm, layout
from .allocator import IdAllocator
from .kvm import GsiRoute, Vm


def default_irqchip_routes() -> list[GsiRoute]:
    """KVM's default table: GSI n -> IOAPIC pin n, and GSI 0-15 also to the PICs (pin n % 8).
    GSI 2 is the PIC cascade, so it goes to the IOAPIC only."""
    routes = [GsiRoute(gsi, kvm.KVM_IRQ_ROUTING_IRQCHIP, kvm.KVM_IRQCHIP_IOAPIC, gsi) for gsi in range(layout.IOAPIC_NUM_PINS)]
    for gsi in range(layout.PIC_NUM_PINS):
        if gsi != 2:
            chip = kvm.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else kvm.KVM_IRQCHIP_PIC_SLAVE
            routes.append(GsiRoute(gsi, kvm.KVM_IRQ_ROUTING_IRQCHIP, chip, gsi % 8))
    return routes


class IsaLine:
    """An ISA interrupt line (KVM_IRQ_LINE): the level is forwarded to the PIC and IOAPIC."""

    def __init__(self, vm: Vm, pin: int) -> None:
        self.vm = vm
        self.pin = pin

    def set_level(self, level: bool) -> None:
        self.vm.irq_line(self.pin, level)


class KvmMsiRoute:
    """One MSI vector: a GSI with an MSI routing entry, fed by an irqfd (see `MsiRoute`)."""

    def __init__(self, chip: "KvmInterrupts", gsi: int) -> None:
        self.chip = chip
        self.gsi = gsi
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.address = 0
        self.data = 0
        self.masked = True
        self.attached = False

    @property
    def eventfd(self) -> int:
        return self._eventfd

    def set_message(self, address: int, data: int) -> None:
        if (address, data) != (self.address, self.data):
            self.address, self.data = address, data
            self.chip.update_routes()

    def set_masked(self, masked: bool) -> None:
        self.masked = masked
        # An unmasked vector needs a route before its irqfd fires; a masked one keeps its
        # signals in the eventfd counter until it is attached again (then KVM delivers them).
        if not masked:
            self.chip.update_routes()
        self._attach(not masked)

    def _attach(self, attach: bool) -> None:
        if attach == self.attached:
            return
        if not attach:
            self.chip.vm.irqfd(self._eventfd, self.gsi, deassign=True)
            self.attached = False
            return
        # KVM_IRQFD injects a count already in the eventfd when it is assigned, but leaves the
        # count there, so a later re-mask would report the delivered signal as pending again.
        # Take the held count out first and signal once after assigning: KVM's wake-up then
        # delivers it and consumes it.
        held = self._take_count()
        self.chip.vm.irqfd(self._eventfd, self.gsi)
        self.attached = True
        if held:
            os.eventfd_write(self._eventfd, 1)

    def _take_count(self) -> int:
        try:
            return os.eventfd_read(self._eventfd)
        except BlockingIOError:
            return 0

    def pending(self) -> bool:
        """Whether a signal arrived while masked (reads and restores the eventfd counter)."""
        if self.attached:
            return False
        try:
            count = os.eventfd_read(self._eventfd)
        except BlockingIOError:
            return False
        os.eventfd_write(self._eventfd, count)
        return True

    def clear_pending(self) -> None:
        if not self.attached:
            self._take_count()

    def trigger(self) -> None:
        os.eventfd_write(self._eventfd, 1)

    def close(self) -> None:
        self._attach(False)
        os.close(self._eventfd)
        self.chip.release(self)


class KvmInterrupts:
    """`InterruptController` and `IoEventRegistry` over a VM with an in-kernel irqchip."""

    def __init__(self, vm: Vm, gsis: IdAllocator) -> None:
        self.vm = vm
        self.gsis = gsis
        self._lock = threading.Lock()
        self._msi: dict[int, KvmMsiRoute] = {}

    # InterruptController
    def irq_line(self, pin: int) -> IsaLine:
        return IsaLine(self.vm, pin)

    def msi_route(self) -> KvmMsiRoute:
        gsi = self.gsis.allocate()
        route = KvmMsiRoute(self, gsi)
        with self._lock:
            self._msi[gsi] = route
        return route

    def release(self, route: KvmMsiRoute) -> None:
        with self._lock:
            if self._msi.pop(route.gsi, None) is None:
                return
        self.gsis.free(route.gsi)
        self.update_routes()

    def update_routes(self) -> None:
        with self._lock:
            routes = default_irqchip_routes()
            routes += [
                GsiRoute(r.gsi, kvm.KVM_IRQ_ROUTING_MSI, address=r.address, data=r.data)
                for r in self._msi.values()
                if r.address
            ]
            self.vm.set_gsi_routing(routes)

    # IoEventRegistry
    def add_ioeventfd(self, addr: int, length: int, fd: int, *, pio: bool = False, datamatch: int | None = None) -> None:
        self.vm.ioeventfd(addr, length, fd, pio=pio, datamatch=datamatch)

    def remove_ioeventfd(self, addr: int, length: int, fd: int, *, pio: bool = False, datamatch: int | None = None) -> None:
        self.vm.ioeventfd(addr, length, fd, pio=pio, datamatch=datamatch, deassign=True)
