"""i8042 reset, ACPI sleep control, pvpanic: each callback fires on exactly the right write."""

from __future__ import annotations

import pytest

from minivmm.bus import Bus
from minivmm.devices.acpi_pm import SLP_EN, WAK_STS, AcpiSleepRegisters
from minivmm.devices.i8042 import I8042
from minivmm.devices.pvpanic import PVPANIC_CRASH_LOADED, PVPANIC_PANICKED, PvPanic


class Calls:
    def __init__(self) -> None:
        self.args: list[tuple[object, ...]] = []

    def __call__(self, *args: object) -> None:
        self.args.append(args)

    @property
    def count(self) -> int:
        return len(self.args)


# --------------------------------------------------------------------- i8042


@pytest.fixture
def kbd_bus() -> tuple[Bus, Calls]:
    reset = Calls()
    kbd = I8042(on_reset=reset)
    bus = Bus("pio")
    bus.register(0x60, 1, kbd.data_port, "i8042-data")
    bus.register(0x64, 1, kbd.command_port, "i8042-cmd")
    return bus, reset


def test_i8042_linux_reboot_k(kbd_bus: tuple[Bus, Calls]) -> None:
    bus, reset = kbd_bus
    # kb_wait(): poll the status port until the input buffer is empty.
    value, rng = bus.read(0x64, 1)
    assert rng is not None and value & 0x02 == 0
    assert value == 0
    bus.write(0x64, 1, 0xFE)
    assert reset.count == 1


@pytest.mark.parametrize("cmd", [0x20, 0x60, 0xAA, 0xAD, 0xAE, 0xD1, 0xFF, 0xF1, 0xFD])
def test_i8042_other_commands_do_not_reset(kbd_bus: tuple[Bus, Calls], cmd: int) -> None:
    bus, reset = kbd_bus
    bus.write(0x64, 1, cmd)
    assert reset.count == 0


def test_i8042_data_port_never_resets(kbd_bus: tuple[Bus, Calls]) -> None:
    bus, reset = kbd_bus
    for value in (0xFE, 0xFC, 0x00, 0xFF):
        bus.write(0x60, 1, value)
    assert bus.read(0x60, 1)[0] == 0
    assert reset.count == 0


def test_i8042_leaves_port_b_free(kbd_bus: tuple[Bus, Calls]) -> None:
    bus, _ = kbd_bus
    assert bus.lookup(0x61) is None


def test_i8042_any_pulse_of_the_reset_line_resets() -> None:
    reset = Calls()
    kbd = I8042(on_reset=reset)
    kbd.command_port.write(0, 1, 0xF0)  # pulses all four output lines, reset included
    kbd.command_port.write(0, 1, 0xFE)
    assert reset.count == 2 and kbd.resets == 2


# --------------------------------------------------------------------- ACPI sleep registers


def test_acpi_s5_poweroff_sequence_as_acpica_writes_it() -> None:
    sleep = Calls()
    regs = AcpiSleepRegisters(on_sleep=sleep)
    bus = Bus("pio")
    bus.register(0x600, 1, regs.control_port, "acpi-sleep-control")
    bus.register(0x601, 1, regs.status_port, "acpi-sleep-status")
    bus.write(0x601, 1, WAK_STS)  # clear wake status first
    assert sleep.count == 0
    bus.write(0x600, 1, (5 << 2) | SLP_EN)
    assert sleep.args == [(5,)]


@pytest.mark.parametrize("slp_typ", range(8))
def test_acpi_slp_typ_decoded(slp_typ: int) -> None:
    sleep = Calls()
    AcpiSleepRegisters(on_sleep=sleep).control_port.write(0, 1, (slp_typ << 2) | SLP_EN | 0x03)
    assert sleep.args == [(slp_typ,)]


@pytest.mark.parametrize("value", [0x00, 5 << 2, 0x1C, 0x03, 0xC0, 0xDF])
def test_acpi_no_sleep_without_slp_en(value: int) -> None:
    sleep = Calls()
    AcpiSleepRegisters(on_sleep=sleep).control_port.write(0, 1, value)
    assert sleep.count == 0


def test_acpi_status_register_never_sleeps_and_wak_sts_is_w1c() -> None:
    sleep = Calls()
    regs = AcpiSleepRegisters(on_sleep=sleep)
    for value in (0xFF, SLP_EN, (5 << 2) | SLP_EN):
        regs.status_port.write(0, 1, value)
    assert sleep.count == 0
    assert regs.status_port.read(0, 1) == 0
    regs.wake()
    assert regs.status_port.read(0, 1) == WAK_STS
    regs.status_port.write(0, 1, 0x00)  # writing 0 leaves it
    assert regs.status_port.read(0, 1) == WAK_STS
    regs.status_port.write(0, 1, WAK_STS)
    assert regs.status_port.read(0, 1) == 0


def test_acpi_adjacent_two_byte_layout() -> None:
    sleep = Calls()
    regs = AcpiSleepRegisters(on_sleep=sleep)
    bus = Bus("pio")
    bus.register(0x600, 2, regs, "acpi-sleep")
    bus.write(0x601, 1, (5 << 2) | SLP_EN)  # the status register: no sleep
    assert sleep.count == 0
    bus.write(0x600, 1, (5 << 2) | SLP_EN)
    assert sleep.args == [(5,)]
    regs.wake()
    assert bus.read(0x600, 2)[0] == WAK_STS << 8


# --------------------------------------------------------------------- pvpanic


def test_pvpanic_reports_supported_events() -> None:
    dev = PvPanic(on_panic=Calls())
    assert dev.read(0, 1) == PVPANIC_PANICKED | PVPANIC_CRASH_LOADED == 3


def test_pvpanic_panicked_calls_on_panic_once() -> None:
    panic, crash = Calls(), Calls()
    bus = Bus("pio")
    bus.register(0x505, 1, PvPanic(on_panic=panic, on_crash_loaded=crash), "pvpanic")
    assert bus.read(0x505, 1)[0] == 3
    bus.write(0x505, 1, PVPANIC_PANICKED)
    assert panic.count == 1 and crash.count == 0


@pytest.mark.parametrize("value", [0x00, PVPANIC_CRASH_LOADED, 0x04, 0xF0, 0xFC])
def test_pvpanic_other_writes_do_not_panic(value: int) -> None:
    panic = Calls()
    dev = PvPanic(on_panic=panic)
    dev.write(0, 1, value)
    assert panic.count == 0


def test_pvpanic_crash_loaded_callback() -> None:
    panic, crash = Calls(), Calls()
    dev = PvPanic(on_panic=panic, on_crash_loaded=crash)
    dev.write(0, 1, PVPANIC_CRASH_LOADED)
    assert crash.count == 1 and panic.count == 0
    assert dev.events == PVPANIC_CRASH_LOADED
