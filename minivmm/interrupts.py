"""What a device may do with interrupts and notifications, without touching KVM.

The machine implements these protocols on top of KVM (KVM_IRQ_LINE, KVM_SET_GSI_ROUTING,
KVM_IRQFD, KVM_IOEVENTFD); unit tests implement them with fakes.
"""

from __future__ import annotations

from typing import Protocol


class InterruptLine(Protocol):
    """A wire to an IOAPIC/PIC pin (ISA devices such as the 16550 on IRQ 4)."""

    def set_level(self, level: bool) -> None: ...


class MsiRoute(Protocol):
    """One MSI message route: a KVM GSI fed by an irqfd.

    A device signals by writing 1 to `eventfd` (from any thread; KVM injects without a
    Python round trip). While masked, the irqfd is detached from KVM so writes accumulate in
    the eventfd counter; `pending()` reports (without consuming) whether any arrived, and
    unmasking re-attaches the irqfd, which makes KVM deliver the accumulated signal.
    """

    @property
    def eventfd(self) -> int: ...

    def set_message(self, address: int, data: int) -> None: ...

    def set_masked(self, masked: bool) -> None: ...

    def pending(self) -> bool: ...

    def clear_pending(self) -> None: ...

    def trigger(self) -> None: ...

    def close(self) -> None: ...


class InterruptController(Protocol):
    def irq_line(self, pin: int) -> InterruptLine: ...

    def msi_route(self) -> MsiRoute: ...


class IoEventRegistry(Protocol):
    """Attach an eventfd to a guest MMIO/PIO address (KVM_IOEVENTFD): a guest write there
    signals the eventfd inside KVM, without an exit to userspace."""

    def add_ioeventfd(self, addr: int, length: int, fd: int, *, pio: bool = False, datamatch: int | None = None) -> None: ...

    def remove_ioeventfd(self, addr: int, length: int, fd: int, *, pio: bool = False, datamatch: int | None = None) -> None: ...
