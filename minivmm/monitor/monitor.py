"""One monitor per machine: the command table's target, shared by QMP and the human monitor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exit_handler import Stop
from .hmp import HumanMonitor
from .objects import MachineObjects

if TYPE_CHECKING:
    from ..machine import Machine


class Monitor:
    """What the commands act on: the machine, its objects and devices, and the HMP front end."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.objects = MachineObjects(machine)
        self.hmp = HumanMonitor(self)

    def quit(self) -> None:
        self.machine.request_stop(Stop(0, "quit from the monitor", "host-qmp-quit"))

    def system_reset(self) -> None:
        """QEMU resets the machine in place; minivmm ends the run as a guest reboot does."""
        self.machine.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
        self.machine.request_stop(Stop(0, "reset from the monitor (minivmm ends the run, as for a guest reboot)",
                                       "host-qmp-system-reset"))  # fmt: skip
