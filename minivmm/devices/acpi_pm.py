"""The sleep control and sleep status registers of a hardware-reduced ACPI platform.

On a HW-reduced platform (FADT flag HW_REDUCED_ACPI) there are no PM1 blocks; the FADT's
SLEEP_CONTROL_REG and SLEEP_STATUS_REG (ACPI 6.x §4.8.3.7 "Sleep Control Register" and
§4.8.3.8 "Sleep Status Register") say where the OS writes to enter a sleep state. To power
off, Linux (ACPICA ``acpi_hw_extended_sleep``) writes WAK_STS to the status register to
clear it, then ``SLP_TYPx << 2 | SLP_EN`` to the control register, with SLP_TYPx the value of
the \\_S5 package in the DSDT.

The device knows no port numbers. The layout places the registers (by default 0x600 for
control and 0x601 for status); the machine registers ``control_port`` and ``status_port``
as 1-byte ranges there — or, when they are adjacent, the device itself as one 2-byte range
(offset 0 control, offset 1 status).

Threads: ``on_sleep`` is called on the vCPU thread that made the write.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from ..register_block import Register, RegisterBlock

# Sleep control register (§4.8.3.7): bits 1:0 reserved, 4:2 SLP_TYPx, 5 SLP_EN, 7:6 reserved.
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7
SLP_EN = 0x20

# Sleep status register (§4.8.3.8): bit 7 WAK_STS (write 1 to clear), the rest reserved.
WAK_STS = 0x80

CONTROL_OFFSET = 0
STATUS_OFFSET = 1


class AcpiSleepRegisters(RegisterBlock):
    """Sleep control and sleep status registers: as a block, the adjacent 2-byte layout;
    ``control_port`` and ``status_port`` are each register alone at offset 0.

    ``on_sleep(slp_typ)`` is called for every control write with SLP_EN set; the machine
    compares ``slp_typ`` with the S5 value it put in the DSDT and ends the run.
    """

    def __init__(self, on_sleep: Callable[[int], None]) -> None:
        self._on_sleep = on_sleep
        self._wak_sts = False
        control = Register(CONTROL_OFFSET, 1, "SLEEP_CONTROL_REG", self._read_control, self._write_control)
        status = Register(STATUS_OFFSET, 1, "SLEEP_STATUS_REG", self._read_status, self._write_status)
        super().__init__((control, status))
        self.control_port = RegisterBlock((replace(control, offset=0),))
        self.status_port = RegisterBlock((replace(status, offset=0),))

    def wake(self) -> None:
        """The machine resumed the guest from a sleep state: set WAK_STS for the OS to see."""
        self._wak_sts = True

    def _read_control(self) -> int:
        return 0  # SLP_EN is write-only and SLP_TYPx is only meaningful with it

    def _write_control(self, value: int) -> None:
        if value & SLP_EN:
            self._on_sleep((value >> SLP_TYP_SHIFT) & SLP_TYP_MASK)

    def _read_status(self) -> int:
        return WAK_STS if self._wak_sts else 0

    def _write_status(self, value: int) -> None:
        if value & WAK_STS:
            self._wak_sts = False  # write-1-to-clear
