"""The pvpanic I/O port: lets the guest tell the VMM that it panicked.

One byte, conventionally at port 0x505, described to the guest by an ACPI device with
_HID "QEMU0001" and that port as its I/O resource (Linux ``drivers/misc/pvpanic``). A read
returns the events the host supports; the guest writes the event bit when it happens:
PVPANIC_PANICKED from its panic notifier, or PVPANIC_CRASH_LOADED instead when a kdump
kernel is loaded and will take over.

Threads: the callbacks are called on the vCPU thread that made the write.
"""

from __future__ import annotations

from typing import Callable

from ..register_block import Register, RegisterBlock

PVPANIC_PANICKED = 1 << 0
PVPANIC_CRASH_LOADED = 1 << 1
PVPANIC_SUPPORTED = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED


class PvPanic(RegisterBlock):
    """``on_panic()`` is called when the guest reports a panic; ``on_crash_loaded()``, if
    given, when it reports that a crash kernel is taking over (otherwise that is ignored:
    the guest is still alive and will write its dump)."""

    def __init__(self, on_panic: Callable[[], None], on_crash_loaded: Callable[[], None] | None = None) -> None:
        self._on_panic = on_panic
        self._on_crash_loaded = on_crash_loaded
        self.events = 0  # every event bit the guest has reported
        super().__init__((Register(0, 1, "pvpanic", self._read_events, self._write_event),))

    def _read_events(self) -> int:
        return PVPANIC_SUPPORTED

    def _write_event(self, value: int) -> None:
        value &= PVPANIC_SUPPORTED  # unsupported bits are not events
        self.events |= value
        if value & PVPANIC_PANICKED:
            self._on_panic()
        elif value & PVPANIC_CRASH_LOADED and self._on_crash_loaded is not None:
            self._on_crash_loaded()
