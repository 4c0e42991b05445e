"""ACPI tables for a hardware-reduced platform (ACPI 6.5, chapter 5), and the sleep registers.

Layout, all in `layout.ACPI` (0xE0000-0xFFFFF, so a guest that is not told where the RSDP is
finds it by scanning, section 5.2.5.1): RSDP (revision 2) at 0xE0000 -> XSDT -> FADT and
MADT; FADT -> DSDT.

Power-off (section 4.1 "Hardware-Reduced ACPI", 4.8.3.7 "Sleep Control and Status
Registers", 7.4.2 "\\_Sx (System States)"): the FADT sets HW_REDUCED_ACPI and gives
SLEEP_CONTROL_REG and SLEEP_STATUS_REG as one-byte System I/O registers at
`layout.ACPI_SLEEP_CONTROL_PORT` / `layout.ACPI_SLEEP_STATUS_PORT`. The DSDT has
`Name(_S5, Package(){5, 0})`. To power off, Linux reads SLP_TYPa = 5 from \\_S5, writes
WAK_STS (0x80) to the status register to clear it, then writes
`SLP_TYPx << 2 | SLP_EN (1 << 5)` = 0x34 to the control register. `minivmm.devices.acpi_pm.AcpiSleepRegisters` is
the device on those ports: it calls `on_sleep(slp_typ)` and the machine ends the run when
that is `S5_SLP_TYP`.

Hotplug and the power button (README "Hotplug"): `\\_SB.GED0` is a Generic Event Device
(ACPI0013, 5.6.9) whose _EVT reads the pending events (devices/acpi_ged.py) and either calls
`\\_SB.PCI0.PSCN`, which notifies each newly filled slot object `\\_SB.PCI0.Snn`
(devices/pci_hotplug.py), or notifies the control-method power button `\\_SB.PWRB`
(PNP0C0C) with 0x80.

The DSDT also describes the pvpanic device (`Device(PEVT)`, _HID "QEMU0001", one I/O port at
`layout.PVPANIC_PORT`; Linux's pvpanic-mmio driver reads the port for the supported events
and writes 1 (PVPANIC_PANICKED) on panic) and, unless `pci=False`, the PCI host bridge
`\\_SB.PCI0` (PNP0A03) with its bus, I/O and memory windows and the INTx routing (_PRT):
with ACPI on, Linux finds PCI root buses only through such an object.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .. import layout
from ..devices.acpi_ged import GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON, GEVT_SIZE
from ..devices.pci_hotplug import HOTPLUG_SLOTS, PCIU_SIZE
from ..memory import GuestMemory
from . import aml

OEM_ID = b"MINVMM"
OEM_TABLE_ID = b"MINIVMM "
OEM_REVISION = 1
CREATOR_ID = b"MVMM"
CREATOR_REVISION = 1

# Table header (5.2.6): Signature, Length, Revision, Checksum, OEMID, OEM Table ID,
# OEM Revision, Creator ID, Creator Revision.
ACPI_TABLE_HEADER = struct.Struct("<4sIBB6s8sI4sI")
# RSDP (5.2.5.3): Signature, Checksum, OEMID, Revision, RsdtAddress, Length, XsdtAddress,
# Extended Checksum, Reserved.
RSDP_STRUCT = struct.Struct("<8sB6sBIIQB3s")
RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2
RSDP_V1_LENGTH = 20
# Generic Address Structure (5.2.3.2): Address Space ID, Register Bit Width, Register Bit
# Offset, Access Size, Address.
GENERIC_ADDRESS = struct.Struct("<BBBBQ")
ACPI_ADR_SPACE_SYSTEM_IO = 1
ACCESS_SIZE_BYTE = 1

XSDT_REVISION = 1
DSDT_REVISION = 2  # 64-bit AML integers
MADT_REVISION = 5
FADT_REVISION = 6
FADT_MINOR_VERSION = 5
FADT_LENGTH = 276

# FADT field offsets (5.2.9, table 5.9).
FADT_FIRMWARE_CTRL = 36
FADT_DSDT = 40
FADT_PREFERRED_PM_PROFILE = 45
FADT_SCI_INT = 46
FADT_IAPC_BOOT_ARCH = 109
FADT_FLAGS = 112
FADT_MINOR_VERSION_OFFSET = 131
FADT_X_FIRMWARE_CTRL = 132
FADT_X_DSDT = 140
FADT_SLEEP_CONTROL_REG = 244
FADT_SLEEP_STATUS_REG = 256
FADT_HYPERVISOR_VENDOR_IDENTITY = 268

# FADT Flags (table 5.10).
WBINVD = 1 << 0
PWR_BUTTON = 1 << 4  # no fixed-feature power button
SLP_BUTTON = 1 << 5  # no fixed-feature sleep button
HW_REDUCED_ACPI = 1 << 20
# IA-PC Boot Architecture Flags (table 5.11).
LEGACY_DEVICES = 1 << 0  # ISA devices: COM1
IAPC_8042 = 1 << 1  # an i8042 at 0x60/0x64
VGA_NOT_PRESENT = 1 << 2
MSI_NOT_SUPPORTED = 1 << 3
CMOS_RTC_NOT_PRESENT = 1 << 5

# MADT (5.2.12): Local Interrupt Controller Address, Flags, then structures.
MADT_FIXED = struct.Struct("<II")
PCAT_COMPAT = 1 << 0  # dual 8259s present
MADT_LOCAL_APIC = struct.Struct("<BBBBI")  # Type 0, Length 8, ACPI Processor UID, APIC ID, Flags
MADT_IO_APIC = struct.Struct("<BBBBII")  # Type 1, Length 12, I/O APIC ID, Reserved, Address, GSI Base
MADT_INTERRUPT_SOURCE_OVERRIDE = struct.Struct("<BBBBIH")  # Type 2, Length 10, Bus, Source, GSI, Flags
MADT_LOCAL_APIC_NMI = struct.Struct("<BBBHB")  # Type 4, Length 6, UID, Flags, LINT#
LOCAL_APIC_ENABLED = 1 << 0
IOAPIC_ID = 0  # what KVM's in-kernel IOAPIC reports in its ID register after reset
ALL_PROCESSORS = 0xFF
MPS_INTI_POLARITY_HIGH = 1
MPS_INTI_TRIGGER_EDGE = 1 << 2

# The SLP_TYPx value of \_S5 (the sleep registers' bits live with their device, devices/acpi_pm.py).
S5_SLP_TYP = 5

PVPANIC_HID = "QEMU0001"
GED_HID = "ACPI0013"  # Generic Event Device (5.6.9)
POWER_BUTTON_HID = "PNP0C0C"  # control-method power button (4.8.2.2.1.2)

# Notification values (5.6.6, table 5.166).
NOTIFY_DEVICE_CHECK = 0x01
NOTIFY_BUTTON_PRESSED = 0x80  # for a power button: "the button was pressed"


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` sum to 0 modulo 256 (5.2.6)."""
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: header (5.2.6) + body, with the checksum filled in."""
    length = ACPI_TABLE_HEADER.size + len(body)
    header = ACPI_TABLE_HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def gas_io(port: int, width_bits: int = 8) -> bytes:
    return GENERIC_ADDRESS.pack(ACPI_ADR_SPACE_SYSTEM_IO, width_bits, 0, ACCESS_SIZE_BYTE, port)


def rsdp(xsdt_addr: int) -> bytes:
    """RSDP revision 2 (5.2.5.3): the first 20 bytes and the whole 36 bytes each sum to 0."""
    raw = bytearray(RSDP_STRUCT.pack(RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, 0, RSDP_STRUCT.size, xsdt_addr, 0, b"\0\0\0"))
    raw[8] = checksum(raw[:RSDP_V1_LENGTH])
    raw[32] = checksum(raw)
    return bytes(raw)


def xsdt(entries: list[int]) -> bytes:
    return sdt(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", e) for e in entries))


def fadt(dsdt_addr: int, cmos_rtc: bool = False) -> bytes:
    """FADT revision 6 (5.2.9) for a hardware-reduced platform with legacy COM1 and i8042."""
    body = bytearray(FADT_LENGTH)
    struct.pack_into("<I", body, FADT_DSDT, dsdt_addr)
    boot_arch = LEGACY_DEVICES | IAPC_8042 | VGA_NOT_PRESENT | (0 if cmos_rtc else CMOS_RTC_NOT_PRESENT)
    struct.pack_into("<H", body, FADT_IAPC_BOOT_ARCH, boot_arch)
    struct.pack_into("<I", body, FADT_FLAGS, WBINVD | PWR_BUTTON | SLP_BUTTON | HW_REDUCED_ACPI)
    body[FADT_MINOR_VERSION_OFFSET] = FADT_MINOR_VERSION
    struct.pack_into("<Q", body, FADT_X_DSDT, dsdt_addr)
    body[FADT_SLEEP_CONTROL_REG : FADT_SLEEP_CONTROL_REG + GENERIC_ADDRESS.size] = gas_io(layout.ACPI_SLEEP_CONTROL_PORT)
    body[FADT_SLEEP_STATUS_REG : FADT_SLEEP_STATUS_REG + GENERIC_ADDRESS.size] = gas_io(layout.ACPI_SLEEP_STATUS_PORT)
    body[FADT_HYPERVISOR_VENDOR_IDENTITY : FADT_LENGTH] = b"MINIVMM\0"
    return sdt(b"FACP", FADT_REVISION, bytes(body[ACPI_TABLE_HEADER.size :]))


def madt(ncpus: int) -> bytes:
    """MADT (5.2.12): one enabled Processor Local APIC per vCPU (APIC ID = index), the I/O
    APIC with GSI base 0, ISA IRQ0 -> GSI 2 override, and LINT1 as NMI on every CPU."""
    parts = [MADT_FIXED.pack(layout.LAPIC.base, PCAT_COMPAT)]
    for cpu in range(ncpus):
        parts.append(MADT_LOCAL_APIC.pack(0, MADT_LOCAL_APIC.size, cpu, cpu, LOCAL_APIC_ENABLED))
    parts.append(MADT_IO_APIC.pack(1, MADT_IO_APIC.size, IOAPIC_ID, 0, layout.IOAPIC.base, 0))
    parts.append(MADT_INTERRUPT_SOURCE_OVERRIDE.pack(2, MADT_INTERRUPT_SOURCE_OVERRIDE.size, 0, 0, 2, 0))
    parts.append(MADT_LOCAL_APIC_NMI.pack(4, MADT_LOCAL_APIC_NMI.size, ALL_PROCESSORS, 0, 1))
    return sdt(b"APIC", MADT_REVISION, b"".join(parts))


def pci_host_bridge(mem_size: int, slots: PciSlots | None = None) -> bytes:
    """\\_SB.PCI0: the PCI host bridge (PNP0A03) using configuration mechanism #1, with _PRT
    entries for the slots that can hold a device and a hotplug object per hot-pluggable slot."""
    slots = slots or PciSlots()
    mmio32 = layout.PCI_MMIO32
    mmio64 = layout.pci_mmio64_window(mem_size)
    mmio64_base, mmio64_size = mmio64.base, mmio64.size
    crs = aml.resource_template(
        aml.word_bus_number(0x00, 0xFF),
        aml.io_port(layout.PCI_CONFIG_ADDRESS_PORT, layout.PCI_CONFIG_ADDRESS_PORT, 1, layout.PCI_CONFIG_PORT_COUNT),
        aml.word_io(0x0000, layout.PCI_CONFIG_ADDRESS_PORT - 1),
        aml.word_io(0x0D00, 0xFFFF),
        aml.dword_memory(mmio32.base, mmio32.end - 1),
        aml.qword_memory(mmio64_base, mmio64_base + mmio64_size - 1),
    )
    prt = aml.package(
        *(
            aml.package(aml.dword(slot << 16 | 0xFFFF), aml.integer(pin), aml.integer(0), aml.integer(layout.pci_intx_gsi(slot, pin)))
            for slot in slots.routed
            for pin in range(4)
        )
    )
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A03")),
        aml.name("_UID", aml.integer(0)),
        aml.name("_SEG", aml.integer(0)),
        aml.name("_BBN", aml.integer(0)),
        aml.name("_CRS", crs),
        aml.name("_PRT", prt),
        *pci_slots(slots.hotplug),
        *pci_hotplug_methods(slots.hotplug),
    )


@dataclass(frozen=True)
class PciSlots:
    """Which bus-0 slots the DSDT describes. `routed`: those that can hold a device, each with
    _PRT entries for INTA-INTD (the others can never raise INTx); `hotplug`: those with a
    `Device (Snn)` for acpiphp, a subset of `routed`. Default: every slot (0-31 routed, 1-31
    hot-pluggable).
    Each slot object costs the guest an ACPI device (~75 ms of emulated boot on kvm_pvm)."""

    routed: Sequence[int] = tuple(range(HOTPLUG_SLOTS.stop))
    hotplug: Sequence[int] = tuple(HOTPLUG_SLOTS)


def slot_name(slot: int) -> str:
    """The ACPI name of bus-0 slot `slot`'s object under PCI0: S01 .. S31."""
    return f"S{slot:02X}"


def pci_slots(hotplug: Sequence[int] = HOTPLUG_SLOTS) -> list[bytes]:
    """One `Device (Snn)` per hot-pluggable slot: _ADR (6.1.1: device << 16 | function, here
    function 0) and _SUN, the slot number (6.1.12). acpiphp attaches its notify handler to each (drivers/pci/hotplug/acpiphp_glue.c)."""
    return [
        aml.device(slot_name(slot), aml.name("_ADR", aml.integer(slot << 16)), aml.name("_SUN", aml.integer(slot)))
        for slot in hotplug
    ]


AML_RETURN_OP = b"\xa4"  # ReturnOp (ACPI 6.5 §20.2.5.3)


def pci_hotplug_methods(hotplug: Sequence[int] = HOTPLUG_SLOTS) -> list[bytes]:
    """PCIU, the hotplug controller's register (read-to-clear), and `PSCN`, which reads it
    once and sends Device Check to each slot whose bit is set:

        OperationRegion (PCST, SystemIO, PCI_HOTPLUG_PORT, 4)
        Field (PCST, DWordAcc, NoLock, Preserve) { PCIU, 32 }
        Method (PSCN, 0, Serialized) {
            Local0 = PCIU
            If (Local0 & (1 << 1)) { Notify (S01, 1) }  ... up to S1F
        }
    """
    region = aml.operation_region("PCST", aml.REGION_SPACE_SYSTEM_IO, layout.PCI_HOTPLUG_PORT, PCIU_SIZE)
    field = aml.field("PCST", aml.FIELD_ACCESS_DWORD | aml.FIELD_UPDATE_PRESERVE, ("PCIU", 8 * PCIU_SIZE))
    notifies = [aml.if_(aml.and_(aml.local(0), aml.integer(1 << slot)), aml.notify(slot_name(slot), NOTIFY_DEVICE_CHECK)) for slot in hotplug]
    # With no hot-pluggable slot PSCN still reads (so clears) PCIU: `Return (PCIU)`, as a Local
    # set and never used draws an iasl warning.
    read = aml.store(aml.name_string("PCIU"), aml.local(0)) if notifies else AML_RETURN_OP + aml.name_string("PCIU")
    scan = aml.method("PSCN", 0, read, *notifies, serialized=True)
    return [region, field, scan]


def power_button_device() -> bytes:
    """\\_SB.PWRB: a control-method power button (PNP0C0C). Linux's button driver makes it an
    input device named "Power Button" that reports KEY_POWER on Notify (PWRB, 0x80)."""
    return aml.device("PWRB", aml.name("_HID", aml.eisa_id(POWER_BUTTON_HID)), aml.name("_UID", aml.integer(0)))


def ged_device(pci: bool = True) -> bytes:
    """\\_SB.GED0: the Generic Event Device (ACPI0013, 5.6.9) of devices/acpi_ged.py.

        Name (_CRS, ResourceTemplate () { Interrupt (ResourceConsumer, Level, ActiveHigh,
                                                     Exclusive) { GED_GSI } })
        OperationRegion (GDST, SystemIO, GED_PORT, 4)
        Field (GDST, DWordAcc, NoLock, Preserve) { GEVT, 32 }
        Method (_EVT, 1, Serialized) {
            Local0 = GEVT
            If (Local0 & GED_EVENT_PCI_HOTPLUG) { \\_SB.PCI0.PSCN () }
            If (Local0 & GED_EVENT_POWER_BUTTON) { Notify (\\_SB.PWRB, 0x80) }
        }
    """
    crs = aml.resource_template(aml.extended_interrupt(layout.GED_GSI, edge=False, active_low=False))
    events = [aml.store(aml.name_string("GEVT"), aml.local(0))]
    if pci:
        events.append(aml.if_(aml.and_(aml.local(0), aml.integer(GED_EVENT_PCI_HOTPLUG)), aml.call("\\_SB_.PCI0.PSCN")))
    events.append(aml.if_(aml.and_(aml.local(0), aml.integer(GED_EVENT_POWER_BUTTON)), aml.notify("\\_SB_.PWRB", NOTIFY_BUTTON_PRESSED)))
    return aml.device(
        "GED0",
        aml.name("_HID", aml.string(GED_HID)),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", crs),
        aml.operation_region("GDST", aml.REGION_SPACE_SYSTEM_IO, layout.GED_PORT, GEVT_SIZE),
        aml.field("GDST", aml.FIELD_ACCESS_DWORD | aml.FIELD_UPDATE_PRESERVE, ("GEVT", 8 * GEVT_SIZE)),
        aml.method("_EVT", 1, *events, serialized=True),
    )


def serial_device() -> bytes:
    """\\_SB.COM1: the 16550 (PNP0501) at COM1 with ISA IRQ 4.

    A hardware-reduced ACPI platform has no legacy PIC, so Linux maps no ISA IRQ up front and
    the built-in ttyS0 could not get IRQ 4 (opening /dev/console from user space would fail).
    Described here, the 8250 PNP driver takes the port over with an IRQ mapped through the
    IOAPIC."""
    port = layout.COM1_PORT
    crs = aml.resource_template(aml.io_port(port, port, 1, layout.COM1_PORT_COUNT), aml.irq_no_flags(layout.COM1_IRQ))
    return aml.device(
        "COM1",
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", aml.integer(1)),
        aml.name("_CRS", crs),
    )


def pvpanic_device() -> bytes:
    port = layout.PVPANIC_PORT
    return aml.device(
        "PEVT",
        aml.name("_HID", aml.string(PVPANIC_HID)),
        aml.name("_CRS", aml.resource_template(aml.io_port(port, port, 1, 1))),
    )


def dsdt_aml(mem_size: int, pci: bool = True, slots: PciSlots | None = None) -> bytes:
    """The DSDT's definition block body (AML)."""
    sb = [pci_host_bridge(mem_size, slots)] if pci else []
    sb += [serial_device(), pvpanic_device(), power_button_device(), ged_device(pci)]
    return aml.name("_S5_", aml.package(aml.integer(S5_SLP_TYP), aml.integer(0))) + aml.scope("\\_SB_", *sb)


def dsdt(mem_size: int, pci: bool = True, slots: PciSlots | None = None) -> bytes:
    return sdt(b"DSDT", DSDT_REVISION, dsdt_aml(mem_size, pci, slots))


@dataclass(frozen=True)
class AcpiTables:
    """Where each table went: signature -> (gpa, length)."""

    rsdp_addr: int
    tables: dict[str, tuple[int, int]] = field(default_factory=dict)


def _align(n: int) -> int:
    return layout.align_up(n, 16)


def write_acpi_tables(
    mem: GuestMemory, ncpus: int, mem_size: int, *, pci: bool = True, cmos_rtc: bool = False, slots: PciSlots | None = None
) -> AcpiTables:
    """Build every table into `layout.ACPI`; the RSDP is at its start."""
    if not 1 <= ncpus <= 255:
        raise ValueError(f"ncpus {ncpus} out of range")
    area = layout.ACPI
    rsdp_addr = area.base
    xsdt_addr = _align(rsdp_addr + RSDP_STRUCT.size)
    dsdt_blob = dsdt(mem_size, pci, slots)
    madt_blob = madt(ncpus)
    # XSDT holds two 8-byte entries.
    fadt_addr = _align(xsdt_addr + ACPI_TABLE_HEADER.size + 2 * 8)
    madt_addr = _align(fadt_addr + FADT_LENGTH)
    dsdt_addr = _align(madt_addr + len(madt_blob))
    if dsdt_addr + len(dsdt_blob) > area.end:
        raise ValueError("ACPI tables do not fit in the ACPI area")
    blobs = {
        "RSDP": (rsdp_addr, rsdp(xsdt_addr)),
        "XSDT": (xsdt_addr, xsdt([fadt_addr, madt_addr])),
        "FACP": (fadt_addr, fadt(dsdt_addr, cmos_rtc)),
        "APIC": (madt_addr, madt_blob),
        "DSDT": (dsdt_addr, dsdt_blob),
    }
    mem.write(area.base, bytes(area.size))
    for addr, blob in blobs.values():
        mem.write(addr, blob)
    return AcpiTables(rsdp_addr, {sig: (addr, len(blob)) for sig, (addr, blob) in blobs.items()})


def build_acpi(
    mem: GuestMemory, ncpus: int, mem_size: int, *, pci: bool = True, cmos_rtc: bool = False, slots: PciSlots | None = None
) -> int:
    """Write the ACPI tables; returns the RSDP address (for boot_params/hvm_start_info)."""
    return write_acpi_tables(mem, ncpus, mem_size, pci=pci, cmos_rtc=cmos_rtc, slots=slots).rsdp_addr
