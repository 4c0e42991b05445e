"""PCI: bus 0 behind configuration mechanism #1, type-0 configuration space, BARs, MSI-X.

Modules: `pci_regs` (the constants of Linux's pci_regs.h), `config` (configuration space),
`device` (what the bridge needs from a function), `host` (the host bridge, conf1, BAR
mapping), `msix` (MSI-X). Register blocks inside BARs are `minivmm.register_block`.

Wiring it into a machine::

    bridge = PciHostBridge(
        mmio_bus,                 # the machine's MMIO Bus: BARs are registered on it
        ioevents,                 # IoEventRegistry (KVM_IOEVENTFD) for queue notifications
        resources.mmio32,         # AddressAllocator of the 32-bit BAR window
        resources.mmio64,         # optional 64-bit window (minivmm.allocator.ResourceAllocator)
    )
    pio_bus.register(layout.PCI_CONFIG_ADDRESS_PORT, layout.PCI_CONFIG_PORT_COUNT, bridge.conf1, "pci-conf1")
    slot = bridge.add_device(VirtioPciDevice(pmem, guest_memory, interrupt_controller))

Neither window may overlap RAM, the pmem region or any other MMIO device, and neither may be
described as RAM in the e820 map. Interrupts are MSI-X only (each vector is one
`InterruptController.msi_route()`); the guest needs a local APIC, and an ACPI FADT, if any,
must not set the "MSI not supported" boot flag.
"""

from .config import BarInfo, PciConfigSpace
from .device import BarRouter, IoEventFd, PciDevice, SubRegion
from .host import PciHostBridge
from .msix import MsixTable

__all__ = [
    "BarInfo",
    "BarRouter",
    "IoEventFd",
    "MsixTable",
    "PciConfigSpace",
    "PciDevice",
    "PciHostBridge",
    "SubRegion",
]
