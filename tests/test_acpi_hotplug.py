"""The DSDT's hotplug and power-button objects, decoded and run against the real device models.

`AmlRunner` executes the few AML terms the GED's _EVT and PCI0.PSCN use (Store, And, If,
Notify, method calls, Local/Arg, integers, reads of SystemIO fields) with field reads going
through a PIO `Bus` holding the machine's `GenericEventDevice` and `PciHotplugController` at
their layout ports, so the tests check what the guest's ACPI interpreter will do.
Also: the DSDT disassembles and recompiles cleanly with ACPICA's iasl (acpica-tools).
"""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
from test_acpi import MEM, AmlWalker, parse_pkglen, resources

from minivmm import layout
from minivmm.boot import acpi, aml
from minivmm.bus import Bus
from minivmm.devices.acpi_ged import GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON, GenericEventDevice
from minivmm.devices.pci_hotplug import PciHotplugController


class Line:
    """An interrupt line that remembers its level changes."""

    def __init__(self) -> None:
        self.levels: list[bool] = []

    def set_level(self, level: bool) -> None:
        self.levels.append(level)

    @property
    def high(self) -> bool:
        return bool(self.levels) and self.levels[-1]


class AmlRunner:
    """Runs a DSDT method; field reads go to `pio`; Notify and method calls are recorded."""

    def __init__(self, walker: AmlWalker, pio: Bus) -> None:
        self.w, self.b, self.pio = walker, walker.b, pio
        self.notifies: list[tuple[str, int]] = []
        self.calls: list[str] = []
        self.port_reads: list[tuple[int, int]] = []

    def resolve(self, scope: str, name: str) -> str:
        """ACPI name lookup (5.3): absolute names as is; a single segment searches upward."""
        if name.startswith("\\"):
            return name
        parts = scope.split(".")
        while True:
            candidate = AmlWalker.join(".".join(parts) or "\\", name)
            if any(candidate in d for d in (self.w.names, self.w.fields, self.w.methods)) or candidate in self.w.devices:
                return candidate
            if "." in name or len(parts) == 1:
                raise AssertionError(f"{name} not found from {scope}")
            parts.pop()

    def run(self, path: str, *args: int) -> None:
        flags, start, end = self.w.methods[path]
        assert flags & 7 == len(args), f"{path} takes {flags & 7} arguments"
        self.calls.append(path)
        frame = {"scope": path, "locals": [0] * 8, "args": list(args)}
        self.block(start, end, frame)

    def block(self, i: int, end: int, frame: dict) -> None:
        while i < end:
            i = self.statement(i, frame)
        assert i == end

    def statement(self, i: int, frame: dict) -> int:
        op = self.b[i]
        if op == aml.IfOp:
            length, used = parse_pkglen(self.b, i + 1)
            end = i + 1 + length
            predicate, j = self.term(i + 1 + used, frame)
            if predicate:
                self.block(j, end, frame)
            return end
        if op == aml.StoreOp:
            value, j = self.term(i + 1, frame)
            target = self.b[j]
            assert aml.Local0Op <= target < aml.Local0Op + 8, "Store only into LocalN"
            frame["locals"][target - aml.Local0Op] = value
            return j + 1
        if op == aml.NotifyOp:
            name, j = self.w.name(i + 1)
            value, j = self.term(j, frame)
            target = self.resolve(frame["scope"], name)
            assert target in self.w.devices, f"Notify of {target}, not a device"
            self.notifies.append((target, value))
            return j
        _, j = self.term(i, frame)  # a method call as a statement
        return j

    def term(self, i: int, frame: dict) -> tuple[int, int]:
        op = self.b[i]
        if aml.Local0Op <= op < aml.Local0Op + 8:
            return frame["locals"][op - aml.Local0Op], i + 1
        if aml.Arg0Op <= op < aml.Arg0Op + 7:
            return frame["args"][op - aml.Arg0Op], i + 1
        if op == aml.AndOp:
            left, j = self.term(i + 1, frame)
            right, j = self.term(j, frame)
            assert self.b[j] == 0, "And with a target"
            return left & right, j + 1
        if op in (0x00, 0x01, 0xFF, aml.BytePrefix, aml.WordPrefix, aml.DWordPrefix, aml.QWordPrefix):
            value, j = self.w.data(i)
            return value, j
        name, j = self.w.name(i)
        path = self.resolve(frame["scope"], name)
        if path in self.w.fields:
            return self.read_field(path), j
        if path in self.w.methods:
            self.run(path)
            return 0, j
        raise AssertionError(f"unexpected AML term {op:#x} ({name}) at {i}")

    def read_field(self, path: str) -> int:
        region, flags, bit, bits = self.w.fields[path]
        space, offset, _ = self.w.regions[region]
        assert space == aml.REGION_SPACE_SYSTEM_IO and flags & 0xF == aml.FIELD_ACCESS_DWORD
        assert bit % 32 == 0 and bits == 32
        port = offset + bit // 8
        self.port_reads.append((port, 4))
        value, claimed = self.pio.read(port, 4)
        assert claimed is not None, f"field {path} reads unclaimed port {port:#x}"
        return value


@pytest.fixture
def platform():
    """The GED and the hotplug controller on a PIO bus as the machine places them, and a
    runner over the DSDT."""
    line = Line()
    ged = GenericEventDevice(line)
    hotplug = PciHotplugController()
    pio = Bus("pio")
    pio.register(layout.GED_PORT, layout.GED_PORT_COUNT, ged, "acpi-ged")
    pio.register(layout.PCI_HOTPLUG_PORT, layout.PCI_HOTPLUG_PORT_COUNT, hotplug, "pci-hotplug")
    walker = AmlWalker(acpi.dsdt_aml(MEM))
    return ged, hotplug, line, AmlRunner(walker, pio)


def test_ged_device_objects():
    w = AmlWalker(acpi.dsdt_aml(MEM))
    assert "\\_SB_.GED0" in w.devices and w.names["\\_SB_.GED0._HID"] == "ACPI0013"
    # Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive) { GED_GSI }: 6.4.3.6
    (tag, desc), = resources(w.names["\\_SB_.GED0._CRS"])
    assert tag == 0x89
    assert desc == struct.pack("<BHBBI", 0x89, 6, 0x01, 1, layout.GED_GSI)
    assert w.regions["\\_SB_.GED0.GDST"] == (1, layout.GED_PORT, layout.GED_PORT_COUNT)
    assert w.fields["\\_SB_.GED0.GEVT"] == ("\\_SB_.GED0.GDST", aml.FIELD_ACCESS_DWORD, 0, 32)
    flags, _, _ = w.methods["\\_SB_.GED0._EVT"]
    assert flags == 1 | 1 << 3  # one argument, Serialized


def test_power_button_device():
    w = AmlWalker(acpi.dsdt_aml(MEM))
    assert w.names["\\_SB_.PWRB._HID"] == 0x0C0CD041  # EisaId("PNP0C0C")


def test_pci_slot_objects():
    w = AmlWalker(acpi.dsdt_aml(MEM))
    for slot in range(1, 32):
        path = f"\\_SB_.PCI0.S{slot:02X}_"
        assert path in w.devices
        assert w.names[path + "._ADR"] == slot << 16 and w.names[path + "._SUN"] == slot
    assert "\\_SB_.PCI0.S00_" not in w.devices  # the host bridge is no slot
    assert w.regions["\\_SB_.PCI0.PCST"] == (1, layout.PCI_HOTPLUG_PORT, layout.PCI_HOTPLUG_PORT_COUNT)
    assert w.fields["\\_SB_.PCI0.PCIU"] == ("\\_SB_.PCI0.PCST", aml.FIELD_ACCESS_DWORD, 0, 32)
    assert w.methods["\\_SB_.PCI0.PSCN"][0] == 1 << 3  # no arguments, Serialized


@pytest.mark.parametrize("slots", [[1], [3], [31], [2, 5, 30]])
def test_evt_notifies_each_added_slot_once(platform, slots):
    ged, hotplug, line, runner = platform
    for slot in slots:
        hotplug.slot_added(slot)
    ged.notify(GED_EVENT_PCI_HOTPLUG)
    assert line.high
    runner.run("\\_SB_.GED0._EVT", layout.GED_GSI)
    assert runner.calls == ["\\_SB_.GED0._EVT", "\\_SB_.PCI0.PSCN"]
    assert runner.notifies == [(f"\\_SB_.PCI0.S{s:02X}_", acpi.NOTIFY_DEVICE_CHECK) for s in sorted(slots)]
    assert runner.port_reads == [(layout.GED_PORT, 4), (layout.PCI_HOTPLUG_PORT, 4)]
    # Both registers were read-to-clear and the line went low: a second _EVT does nothing.
    assert not line.high and ged.pending == 0 and hotplug.added == 0
    runner.notifies.clear()
    runner.run("\\_SB_.GED0._EVT", layout.GED_GSI)
    assert runner.notifies == []


def test_evt_power_button(platform):
    ged, hotplug, line, runner = platform
    ged.notify(GED_EVENT_POWER_BUTTON)
    runner.run("\\_SB_.GED0._EVT", layout.GED_GSI)
    assert runner.notifies == [("\\_SB_.PWRB", acpi.NOTIFY_BUTTON_PRESSED)]
    assert "\\_SB_.PCI0.PSCN" not in runner.calls and not line.high


def test_evt_both_events_at_once(platform):
    ged, hotplug, line, runner = platform
    hotplug.slot_added(4)
    ged.notify(GED_EVENT_PCI_HOTPLUG)
    ged.notify(GED_EVENT_POWER_BUTTON)
    runner.run("\\_SB_.GED0._EVT", layout.GED_GSI)
    assert runner.notifies == [("\\_SB_.PCI0.S04_", 1), ("\\_SB_.PWRB", 0x80)]


def test_event_raised_during_evt_keeps_the_line_high(platform):
    """Level triggering: an event after _EVT's read stays pending with the line high, so the
    IOAPIC delivers it again once the handler ends."""
    ged, hotplug, line, runner = platform
    ged.notify(GED_EVENT_POWER_BUTTON)
    assert ged.read(0, 4) == GED_EVENT_POWER_BUTTON and not line.high
    ged.notify(GED_EVENT_PCI_HOTPLUG)
    assert line.high and ged.pending == GED_EVENT_PCI_HOTPLUG


def test_dsdt_without_pci_has_no_slot_scan():
    w = AmlWalker(acpi.dsdt_aml(MEM, pci=False))
    assert "\\_SB_.PCI0.PSCN" not in w.methods and "\\_SB_.GED0._EVT" in w.methods
    # _EVT never refers to the missing PCI0 (its body holds no PCI0 name).
    _, start, end = w.methods["\\_SB_.GED0._EVT"]
    assert b"PCI0" not in w.b[start:end]


def test_ged_rejects_unknown_events():
    ged = GenericEventDevice(Line())
    for bad in (0, 1 << 2, 1 << 31):
        with pytest.raises(ValueError):
            ged.notify(bad)


def test_hotplug_controller_slots():
    hotplug = PciHotplugController()
    for bad in (0, 32, -1):
        with pytest.raises(ValueError):
            hotplug.slot_added(bad)
    hotplug.slot_added(1)
    hotplug.slot_added(31)
    assert hotplug.read(0, 4) == (1 << 1) | (1 << 31)
    assert hotplug.read(0, 4) == 0
    hotplug.slot_added(7)
    assert hotplug.read(0, 1) == 1 << 7  # a byte read sees (and clears) the whole register
    assert hotplug.added == 0


@pytest.mark.parametrize("pci", [True, False])
def test_dsdt_disassembles_and_recompiles_with_iasl(tmp_path, pci):
    """ACPICA's own parser reads the whole DSDT, and the ASL it prints compiles again
    without errors or warnings (iasl exits 0 and reports 0 errors, 0 warnings). `make`
    installs acpica-tools (guest/debian-packages.txt): a missing iasl fails, never skips."""
    assert shutil.which("iasl"), "iasl is missing: install acpica-tools (make deps)"
    (tmp_path / "dsdt.aml").write_bytes(acpi.dsdt(MEM, pci))
    dis = subprocess.run(["iasl", "-d", "dsdt.aml"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert dis.returncode == 0, dis.stdout + dis.stderr
    asl = (tmp_path / "dsdt.dsl").read_text()
    for text in ('Device (GED0)', 'Name (_HID, "ACPI0013"', "Method (_EVT, 1, Serialized)",
                 'Device (PWRB)', 'EisaId ("PNP0C0C")', "Notify (\\_SB.PWRB, 0x80)"):
        assert text in asl, text
    if pci:
        for text in ("Device (S01)", "Device (S1F)", "Method (PSCN, 0, Serialized)", "Notify (S1F, One)", "\\_SB.PCI0.PSCN ()"):
            assert text in asl, text
    comp = subprocess.run(["iasl", "-p", "again", "dsdt.dsl"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert comp.returncode == 0, comp.stdout + comp.stderr
    assert "0 Errors, 0 Warnings" in comp.stdout, comp.stdout


@pytest.mark.parametrize("hotplug", [(), (2,), (2, 5, 30)])
def test_dsdt_describes_only_the_declared_slots(tmp_path, hotplug):
    """With `PciSlots`, _PRT routes exactly the slots that can hold a device (INTA-INTD each,
    the layout's swizzle), only the hot-pluggable ones have a `Device (Snn)`, and PSCN
    notifies only those; iasl still reads and recompiles it."""
    routed = tuple(sorted({0, 1, *hotplug}))  # the bridge and a cold-plugged device in slot 1
    slots = acpi.PciSlots(routed=routed, hotplug=hotplug)
    w = AmlWalker(acpi.dsdt_aml(MEM, slots=slots))
    prt = w.names["\\_SB_.PCI0._PRT"]
    assert sorted({addr >> 16 for addr, _, _, _ in prt}) == list(routed) and len(prt) == 4 * len(routed)
    for addr, pin, source, gsi in prt:
        assert addr & 0xFFFF == 0xFFFF and source == 0 and gsi == layout.pci_intx_gsi(addr >> 16, pin)
    assert sorted(d for d in w.devices if d.startswith("\\_SB_.PCI0.S")) == [f"\\_SB_.PCI0.S{s:02X}_" for s in hotplug]
    (tmp_path / "dsdt.aml").write_bytes(acpi.dsdt(MEM, slots=slots))
    dis = subprocess.run(["iasl", "-d", "dsdt.aml"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert dis.returncode == 0, dis.stdout + dis.stderr
    asl = (tmp_path / "dsdt.dsl").read_text()
    assert asl.count("Notify (S") == len(hotplug)
    comp = subprocess.run(["iasl", "-p", "again", "dsdt.dsl"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert comp.returncode == 0 and "0 Errors, 0 Warnings" in comp.stdout, comp.stdout + comp.stderr
