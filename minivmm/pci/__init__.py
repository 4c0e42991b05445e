"""PCI: bus 0 behind configuration mechanism #1, type-0 configuration space, BARs, MSI-X.

Modules: `regs` (pci_regs.h constants), `config` (configuration space), `device` (what the
bridge needs from a function), `host` (the host bridge, conf1, BAR mapping), `msix` (MSI-X),
`fakes` (test doubles for the KVM-backed interrupt plumbing).
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
