"""The Generic Event Device (GED) of a hardware-reduced ACPI platform.

A hardware-reduced platform has no SCI and no GPE blocks (ACPI 6.5 §4.1), so platform events
reach the OS through a Generic Event Device (§5.6.9 "Interrupt-signaled ACPI events"): an
ACPI device with _HID "ACPI0013" whose _CRS lists interrupts and whose `_EVT(gsi)` method
the OS runs when one fires (Linux ``drivers/acpi/evged.c``: a threaded handler per
interrupt, ``IRQF_ONESHOT``, that evaluates _EVT with the GSI as Arg0).

minivmm's GED has one interrupt (`layout.GED_GSI`, level triggered, active high) and one
32-bit register, GEVT, at `layout.GED_PORT`: the events pending since the last read, as a
bitmap (`GED_EVENT_*`). `notify(events)` sets bits and raises the line; the DSDT's _EVT reads
GEVT, which returns and clears every pending bit and lowers the line, then dispatches each
bit (boot/acpi.py `ged_device`). Level triggering is why no event is lost: an event raised
while _EVT runs keeps the line high, and the IOAPIC delivers it again when Linux unmasks the
line after the handler.

Threads: `notify` is called from any thread (the monitor's); GEVT is read on a vCPU thread.
"""

from __future__ import annotations

from ..interrupts import InterruptLine
from ..register_block import ReadToClearBits, Register, RegisterBlock

# GEVT bits; the DSDT's _EVT tests the same values (boot/acpi.py imports them).
GED_EVENT_PCI_HOTPLUG = 1 << 0  # _EVT calls \_SB.PCI0.PSCN (devices/pci_hotplug.py)
GED_EVENT_POWER_BUTTON = 1 << 1  # _EVT: Notify (\_SB.PWRB, 0x80)
GED_EVENTS = GED_EVENT_PCI_HOTPLUG | GED_EVENT_POWER_BUTTON

GEVT_OFFSET = 0
GEVT_SIZE = 4


class GenericEventDevice(RegisterBlock):
    """The GED's event register; `line` is its interrupt (`layout.GED_GSI`)."""

    def __init__(self, line: InterruptLine) -> None:
        self.line = line
        # The line's level follows "an event is pending", set under the bitmap's lock.
        self._events = ReadToClearBits(line.set_level)
        self.raised = 0  # events ever notified, by count (statistics and tests)
        # Read-to-clear: _EVT reads GEVT once and handles every bit it got.
        super().__init__((Register(GEVT_OFFSET, GEVT_SIZE, "GEVT", self._events.take),))

    def notify(self, events: int) -> None:
        """Make `events` (GED_EVENT_* bits) pending and raise the interrupt.

        Raises ValueError for bits the DSDT does not dispatch (a VMM bug)."""
        if not events or events & ~GED_EVENTS:
            raise ValueError(f"bad GED events {events:#x}")
        self.raised += 1
        self._events.set(events)

    @property
    def pending(self) -> int:
        return self._events.peek()
