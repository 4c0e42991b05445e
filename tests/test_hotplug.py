"""`Machine.hotplug_pmem` and `Machine.power_button` on a real KVM VM (not running: the guest
side is tests/test_hotplug_boot.py): placement, the GED event, and every failure leaving the
machine exactly as it was."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from test_acpi import MEM, AmlWalker
from test_acpi_hotplug import AmlRunner

from minivmm import layout
from minivmm.boot import acpi
from minivmm.devices.acpi_ged import GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON
from minivmm.errors import UserError
from minivmm.machine import Machine, MachineConfig
from minivmm.pci.host import HostBridge
from minivmm.pmemfile import PmemSpec, open_backing

MiB = layout.MiB


@pytest.fixture
def machine(tmp_path: Path):
    with Machine(MachineConfig(kernel=tmp_path / "unused", mem_size=64 * MiB)) as m:
        yield m


def backing(tmp_path: Path, name: str, size: int = 4 * MiB):
    return open_backing(PmemSpec(str(tmp_path / name), size=size, id=name))


def snapshot(m: Machine) -> dict:
    """Everything a hot-add takes or changes."""
    return {
        "pmem": m.resources.pmem.allocations,
        "mmio64": m.resources.mmio64.allocations,
        "mmio32": m.resources.mmio32.allocations,
        "slots": m.resources.memory_slots.used,
        "gsis": m.resources.gsis.used,
        "regions": [(r.gpa, r.size, r.name) for r in m.mem.regions],
        "pci": dict(m.pci.devices),
        "mmio_bus": m.mmio.ranges,
        "plugged": list(m.pmem_plugged),
        "pciu": m.pci_hotplug.added,
        "ged": m.ged.pending,
        "flushers": sorted(t.name for t in threading.enumerate() if t.name.endswith("-flush")),
    }


def test_hotplug_places_maps_plugs_and_raises_the_ged_event(machine: Machine, tmp_path: Path) -> None:
    b = backing(tmp_path, "hot0")
    before = set(machine.pci.devices)
    dev = machine.hotplug_pmem(b)
    (slot,) = set(machine.pci.devices) - before
    window = machine.resources.pmem.window
    assert dev.start == layout.align_up(window.base, layout.PMEM_ALIGN) and dev.size == 4 * MiB
    region = machine.mem.find(dev.start, dev.size)
    assert region.name == "hot0" and region.slot in machine.resources.memory_slots.used
    # The guest's view of the file is the file (a shared mapping).
    machine.mem.write(dev.start + 100, b"through the slot")
    assert (tmp_path / "hot0").read_bytes()[100:116] == b"through the slot"
    assert machine.pci_hotplug.added == 1 << slot
    assert machine.ged.pending == GED_EVENT_PCI_HOTPLUG
    assert machine.pmem_plugged[-1] == (dev, b)


def test_the_dsdt_evt_on_the_machine_bus_notifies_the_new_slot(machine: Machine, tmp_path: Path) -> None:
    """The guest's view end to end, short of a guest: _EVT and PSCN run against the machine's
    own PIO bus find the GED and the controller where the machine put them."""
    assert machine.ged.line.pin == layout.GED_GSI  # the line the DSDT's _CRS names
    before = set(machine.pci.devices)
    machine.hotplug_pmem(backing(tmp_path, "evt"))
    (slot,) = set(machine.pci.devices) - before
    runner = AmlRunner(AmlWalker(acpi.dsdt_aml(MEM)), machine.pio)
    runner.run("\\_SB_.GED0._EVT", layout.GED_GSI)
    assert runner.notifies == [(f"\\_SB_.PCI0.S{slot:02X}_", acpi.NOTIFY_DEVICE_CHECK)]
    machine.power_button()
    runner.notifies.clear()
    runner.run("\\_SB_.GED0._EVT", layout.GED_GSI)
    assert runner.notifies == [("\\_SB_.PWRB", acpi.NOTIFY_BUTTON_PRESSED)]
    assert machine.ged.pending == 0 and machine.pci_hotplug.added == 0


def test_two_hot_adds_take_the_next_window_and_slot(machine: Machine, tmp_path: Path) -> None:
    a = machine.hotplug_pmem(backing(tmp_path, "a"))
    b = machine.hotplug_pmem(backing(tmp_path, "b"))
    assert b.start == a.start + layout.PMEM_ALIGN
    slots = sorted(machine.pci.devices)
    assert machine.pci_hotplug.read(0, 4) == (1 << slots[-2]) | (1 << slots[-1])
    assert machine.ged.read(0, 4) == GED_EVENT_PCI_HOTPLUG and machine.ged.pending == 0


def test_machine_closes_a_hot_added_backing(tmp_path: Path) -> None:
    b = backing(tmp_path, "owned")
    with Machine(MachineConfig(kernel=tmp_path / "unused", mem_size=64 * MiB)) as m:
        m.hotplug_pmem(b)
        assert b.fd >= 0
    assert b.fd == -1


def refused(m: Machine, b, match: str) -> None:
    """A hot-add that must fail with UserError `match` and change nothing."""
    before = snapshot(m)
    with pytest.raises(UserError, match=match):
        m.hotplug_pmem(b)
    assert snapshot(m) == before
    assert b.fd >= 0  # still the caller's
    b.close()  # and closable: no guest view of its mapping is left


def test_no_room_in_the_pmem_window(machine: Machine, tmp_path: Path) -> None:
    window = machine.resources.pmem.window
    machine.resources.pmem.allocate(window.size - 256 * MiB, layout.PMEM_ALIGN, "filler")
    refused(machine, backing(tmp_path, "big", 512 * MiB), "no room")
    machine.hotplug_pmem(backing(tmp_path, "fits", 64 * MiB))  # and the space left still works


def test_no_free_kvm_memory_slot(machine: Machine, tmp_path: Path) -> None:
    slots = machine.resources.memory_slots
    # A KVM with as many slots as the machine uses already (KVM_CAP_NR_MEMSLOTS is ~32k here).
    slots.limit = max(slots.used) + 2
    spare = slots.allocate()
    refused(machine, backing(tmp_path, "noslot"), "out of KVM memory slots")
    slots.free(spare)
    machine.hotplug_pmem(backing(tmp_path, "slot"))


def test_pci_bus_full(machine: Machine, tmp_path: Path) -> None:
    while len(machine.pci.devices) < 32:
        machine.pci.add_device(HostBridge())
    refused(machine, backing(tmp_path, "nopci"), "PCI bus 0 is full")


def test_kvm_refusing_the_slot(machine: Machine, tmp_path: Path, monkeypatch) -> None:
    """The last step failing (KVM_SET_USER_MEMORY_REGION) undoes the PCI function, its
    flusher thread, the slot number and the window (the ioctl's failure is simulated)."""

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(machine.vm, "map_memory", refuse)
    refused(machine, backing(tmp_path, "kvm"), "KVM refused the memory slot")


def test_power_button_raises_its_ged_event(machine: Machine) -> None:
    machine.power_button()
    assert machine.ged.pending == GED_EVENT_POWER_BUTTON
    assert machine.ged.read(0, 4) == GED_EVENT_POWER_BUTTON and machine.ged.pending == 0


def test_concurrent_hot_adds_get_distinct_places(machine: Machine, tmp_path: Path) -> None:
    backings = [backing(tmp_path, f"c{i}") for i in range(4)]
    devices = []
    threads = [threading.Thread(target=lambda b=b: devices.append(machine.hotplug_pmem(b))) for b in backings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({d.start for d in devices}) == 4
    assert bin(machine.pci_hotplug.added).count("1") == 4


def test_only_the_slots_declared_at_boot_take_hot_adds(tmp_path: Path) -> None:
    """At boot the DSDT gets hotplug objects for the lowest `hotplug_slots` free slots (after
    the cold-plugged devices); hot-adds fill those, then are refused with nothing changed."""
    cold = [PmemSpec(str(tmp_path / "cold.img"), size=4 * MiB, id="cold")]
    with Machine(MachineConfig(kernel=tmp_path / "unused", mem_size=64 * MiB, hotplug_slots=2, pmem=cold)) as m:
        slots = m._declare_pci_slots()
        assert sorted(m.pci.devices) == [0, 1]  # the bridge and the cold-plugged device
        assert tuple(slots.hotplug) == (2, 3) and tuple(slots.routed) == (0, 1, 2, 3)
        assert m.pci_hotplug.slots == (2, 3)
        m.hotplug_pmem(backing(tmp_path, "a"))
        m.hotplug_pmem(backing(tmp_path, "b"))
        assert m.pci_hotplug.added == (1 << 2) | (1 << 3)
        refused(m, backing(tmp_path, "c"), r"c: no hot-pluggable PCI slot left: the guest was given 2 at boot \(--hotplug-slots\)")
