"""Just enough of the i8042 keyboard controller for a guest to reset the machine.

Linux's ``reboot=k`` (and the default fallback chain of x86 ``native_machine_emergency_restart``)
waits for the controller's input buffer to drain (status bit 1 clear) and then writes the
"pulse output port" command 0xFE to port 0x64, which pulses the CPU reset line. There is no
keyboard: the status register reads 0 (output buffer empty, input buffer empty), the data
port reads 0, and every other command is ignored.

Registration: two 1-byte port ranges, ``bus.register(layout.I8042_DATA_PORT, 1, kbd.data_port)`` and
``bus.register(layout.I8042_COMMAND_PORT, 1, kbd.command_port)``, so that 0x61 (PC port B, the PIT channel 2 gate
and speaker) stays free for whoever models the PIT.

Threads: ``on_reset`` is called on the vCPU thread that made the write.
"""

from __future__ import annotations

from typing import Callable

from ..register_block import Register, RegisterBlock


I8042_STR_OBF = 0x01  # output buffer full (data waiting at 0x60)
I8042_STR_IBF = 0x02  # input buffer full (controller busy; Linux's kb_wait polls this)

# Commands 0xF0-0xFF pulse output port bits 3:0 low for ~6 us; a 0 in a command bit selects
# the line. Output port bit 0 is the CPU reset line, so 0xFE (and every even command in the
# range) resets the machine.
I8042_CMD_PULSE_FIRST = 0xF0
I8042_CMD_PULSE_RESET = 0xFE
I8042_OUTPUT_RESET_LINE = 0x01


class I8042:
    """A keyboard controller without a keyboard: only the reset line is wired.

    ``on_reset()`` is called when the guest pulses the reset line.
    """

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self.resets = 0
        # Data writes (a parameter to a command we ignore, or a byte for the absent keyboard)
        # are dropped. Bytes past a 1-byte port read 0xFF, as on an ISA bus nobody drives.
        self.data_port = RegisterBlock((Register(0, 1, "data", self._read_data),), fill=0xFF)
        self.command_port = RegisterBlock(
            (Register(0, 1, "status/command", self._read_status, self._write_command),), fill=0xFF
        )

    def _read_data(self) -> int:
        return 0  # no scancodes, no command responses

    def _read_status(self) -> int:
        return 0  # nothing to read, ready for a command

    def _write_command(self, value: int) -> None:
        if value >= I8042_CMD_PULSE_FIRST and not value & I8042_OUTPUT_RESET_LINE:
            self.resets += 1
            self._on_reset()
