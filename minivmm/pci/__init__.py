"""PCI: bus 0 behind configuration mechanism #1, type-0 configuration space, BARs, MSI-X.

Modules: `regs` (pci_regs.h constants), `config` (configuration space), `device` (what the
bridge needs from a function), `host` (the host bridge, conf1, BAR mapping), `msix` (MSI-X),
`registers` (register blocks declared as tables).

Wiring it into a machine::

    bridge = PciHostBridge(
        mmio_bus,                 # the machine's MMIO Bus: BARs are registered on it
        ioevents,                 # IoEventRegistry (KVM_IOEVENTFD) for queue notifications
        MmioWindow(0xC000_0000, 0xFEC0_0000 - 0xC000_0000),   # 32-bit BAR window
        MmioWindow(top_of_ram_above_4g, 1 << 32),              # optional 64-bit window
        pio_bus=pio_bus,          # conf1 goes at 0xCF8-0xCFF
    )
    slot = bridge.add_device(VirtioPciDevice(pmem, guest_memory, interrupt_controller))

Neither window may overlap RAM, the pmem region or any other MMIO device, and neither may be
described as RAM in the e820 map. Interrupts are MSI-X only (each vector is one
`InterruptController.msi_route()`); the guest needs a local APIC, and an ACPI FADT, if any,
must not set the "MSI not supported" boot flag.
"""

from .config import BarInfo, PciConfigSpace
from .device import BarRouter, IoEventFd, PciDevice, SubRegion
from .host import MmioWindow, PciHostBridge
from .msix import MsixTable

__all__ = [
    "BarInfo",
    "BarRouter",
    "IoEventFd",
    "MmioWindow",
    "MsixTable",
    "PciConfigSpace",
    "PciDevice",
    "PciHostBridge",
    "SubRegion",
]
