"""The PCI hotplug controller: tells the guest's ACPI code which bus-0 slots gained a device.

Linux's ACPI PCI hotplug driver (acpiphp, ``drivers/pci/hotplug/acpiphp_glue.c``) attaches a
notify handler to every object under the host bridge's ACPI device that has an _ADR: the
DSDT gives `\\_SB.PCI0` one `Device (Snn)` per slot 1-31 (`_ADR` = slot << 16, `_SUN` = slot).
A Device Check notification (`Notify (Snn, 1)`, ACPI 6.5 §5.6.6) on one makes acpiphp rescan
that slot: it reads the vendor ID through configuration space, sizes and assigns the BARs and
adds the new function, whose driver then probes.

Which slot to notify comes from this controller's one register, PCIU at
`layout.PCI_HOTPLUG_PORT`: a 32-bit bitmap of the slots added since the last read (bit n =
slot n), cleared by the read. The DSDT's method `\\_SB.PCI0.PSCN`, called by the GED's _EVT on
`GED_EVENT_PCI_HOTPLUG`, reads PCIU once and notifies each slot whose bit is set
(boot/acpi.py `pci_hotplug_methods`).

Hot-unplug is not offered (the monitor refuses `device_del` of virtio-pmem, as QEMU does), so
there is no "slots removed" register and no `_EJ0`.

Threads: `slot_added` is called from any thread (the monitor's); PCIU is read on a vCPU thread.
"""

from __future__ import annotations

from ..pci.host import PCI_SLOTS
from ..register_block import ReadToClearBits, Register, RegisterBlock

PCIU_OFFSET = 0
PCIU_SIZE = 4
# Slot 0 is the host bridge: never hot-added.
HOTPLUG_SLOTS = range(1, PCI_SLOTS)


class PciHotplugController(RegisterBlock):
    """The PCIU register: slots added since the guest last read it."""

    def __init__(self) -> None:
        # The slots the guest was given ACPI objects for (set by Machine._declare_pci_slots at
        # boot); until then any.
        self.slots: tuple[int, ...] = tuple(HOTPLUG_SLOTS)
        self._added = ReadToClearBits()
        super().__init__((Register(PCIU_OFFSET, PCIU_SIZE, "PCIU", self._added.take),))

    def slot_added(self, slot: int) -> None:
        """Record that a device was plugged into `slot` (one of `slots`; ValueError otherwise)."""
        if slot not in self.slots:
            raise ValueError(f"PCI slot {slot} cannot be hot-added")
        self._added.set(1 << slot)

    @property
    def added(self) -> int:
        """The bitmap the next PCIU read returns (without clearing it)."""
        return self._added.peek()
