"""The one command table behind QMP, the human monitor and `human-monitor-command`.

Each `Command` has QEMU's QMP name, its arguments (`keyval.Param`: name, QAPI type, optional)
and a handler `run(monitor, args) -> return value`. `dispatch` checks the arguments the way
QEMU's QAPI visitors do — a missing, mistyped or unexpected argument is a `GenericError` — and
turns a `UserError` raised anywhere below into a `GenericError` with the same one line, so a
command that fails changes nothing and answers like QEMU (docs/interop/qmp-spec "Error").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .. import __version__
from ..errors import UserError
from .keyval import Param

if TYPE_CHECKING:
    from .monitor import Monitor

# QEMU's error classes (qapi/error.json QapiErrorClass).
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_FOUND = "DeviceNotFound"


class CommandError(Exception):
    """A QMP error reply: ``{"error": {"class": cls, "desc": desc}}``."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[["Monitor", dict[str, object]], object]
    params: tuple[Param, ...] = ()
    help: str = ""
    extra_args: bool = False  # object-add: the qom-type's own properties come flat


_QAPI_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "size": (int,), "bool": (bool,), "any": (object,)}
_QAPI_NAMES = {"str": "string", "int": "integer", "size": "size", "bool": "boolean", "any": "any"}


def check_args(command: Command, args: object) -> dict[str, object]:
    """QAPI-style argument checking; returns the arguments as a dict."""
    if not isinstance(args, dict):
        raise CommandError(GENERIC_ERROR, "QMP input member 'arguments' must be an object")
    known = {p.name: p for p in command.params}
    for param in command.params:
        if param.name not in args:
            if not param.optional:
                raise CommandError(GENERIC_ERROR, f"Parameter '{param.name}' is missing")
            continue
        value = args[param.name]
        ok = isinstance(value, _QAPI_TYPES[param.type]) and not (param.type in ("int", "size") and isinstance(value, bool))
        if not ok or (param.type == "size" and value < 0):  # type: ignore[operator]
            raise CommandError(GENERIC_ERROR, f"Invalid parameter type for '{param.name}', expected: {_QAPI_NAMES[param.type]}")
    if not command.extra_args:
        for name in args:
            if name not in known:
                raise CommandError(GENERIC_ERROR, f"Parameter '{name}' is unexpected")
    return dict(args)


def dispatch(monitor: "Monitor", name: object, args: object) -> object:
    """Run command `name`; its return value, or `CommandError`."""
    command = COMMANDS.get(name) if isinstance(name, str) else None
    if command is None:
        raise CommandError(COMMAND_NOT_FOUND, f"The command {name} has not been found")
    checked = check_args(command, {} if args is None else args)
    try:
        return command.run(monitor, checked)
    except UserError as exc:
        raise CommandError(GENERIC_ERROR, str(exc)) from None


# -- the commands -------------------------------------------------------------------------------
def _version(m: "Monitor", a: dict[str, object]) -> object:
    major, minor, micro = (int(x) for x in (__version__.split(".") + ["0", "0"])[:3])
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"minivmm {__version__}"}


def _status(m: "Monitor", a: dict[str, object]) -> object:
    state = m.machine.run_state
    return {"status": state, "running": state == "running", "singlestep": False}


def _commands(m: "Monitor", a: dict[str, object]) -> object:
    return [{"name": name} for name in COMMANDS]


def _stop(m: "Monitor", a: dict[str, object]) -> object:
    m.machine.pause()
    return {}


def _cont(m: "Monitor", a: dict[str, object]) -> object:
    m.machine.resume()
    return {}


def _quit(m: "Monitor", a: dict[str, object]) -> object:
    m.quit()
    return {}


def _powerdown(m: "Monitor", a: dict[str, object]) -> object:
    m.machine.power_button()
    m.machine.emit("POWERDOWN")
    return {}


def _reset(m: "Monitor", a: dict[str, object]) -> object:
    m.system_reset()
    return {}


def _power_cut(m: "Monitor", a: dict[str, object]) -> object:
    return {"dropped-pages": m.machine.power_cut()}


def _hmp(m: "Monitor", a: dict[str, object]) -> object:
    return m.hmp.execute(str(a["command-line"]))


def _object_add(m: "Monitor", a: dict[str, object]) -> object:
    m.objects.object_add(a)
    return {}


def _object_del(m: "Monitor", a: dict[str, object]) -> object:
    m.objects.object_del(str(a["id"]))
    return {}


def _device_add(m: "Monitor", a: dict[str, object]) -> object:
    m.objects.device_add(a)
    return {}


def _device_del(m: "Monitor", a: dict[str, object]) -> object:
    m.objects.device_del(str(a["id"]))
    return {}


_COMMAND_LIST: tuple[Command, ...] = (
    Command("qmp_capabilities", lambda m, a: {}, (Param("enable", "any", optional=True),),
            "negotiate capabilities (QMP only; minivmm offers none)"),
    Command("query-version", _version, help="minivmm's version"),
    Command("query-status", _status, help="whether the guest runs"),
    Command("query-commands", _commands, help="every command this monitor knows"),
    Command("query-pci", lambda m, a: m.objects.query_pci(), help="PCI bus 0 and its functions"),
    Command("query-memory-devices", lambda m, a: m.objects.query_memory_devices(), help="virtio-pmem devices"),
    Command("query-memdev", lambda m, a: m.objects.query_memdev(), help="memory backends"),
    Command("x-query-pmem", lambda m, a: [d.to_dict() for d in m.machine.statistics().pmem],
            help="minivmm's own: each virtio-pmem device's flush counters, and whether its flushes fail"),
    Command("object-add", _object_add, (Param("qom-type"), Param("id")), "add a memory-backend-file", extra_args=True),
    Command("object-del", _object_del, (Param("id"),), "remove an unused memory backend"),
    Command("device_add", _device_add, (Param("driver"), Param("id", optional=True)), "hot-add a virtio-pmem-pci device",
            extra_args=True),
    Command("device_del", _device_del, (Param("id"),), "refused: virtio-pmem cannot be unplugged"),
    Command("system_powerdown", _powerdown, help="press the ACPI power button"),
    Command("system_reset", _reset, help="reset the machine (minivmm ends the run, as a guest reboot does)"),
    Command("stop", _stop, help="pause every vCPU"),
    Command("cont", _cont, help="resume every vCPU"),
    Command("quit", _quit, help="end the run"),
    Command("x-power-cut", _power_cut, help="cut the power: end the run with no final flush (minivmm's own)"),
    Command("human-monitor-command", _hmp, (Param("command-line"), Param("cpu-index", "int", optional=True)),
            "run a human monitor command"),
)  # fmt: skip
COMMANDS: dict[str, Command] = {c.name: c for c in _COMMAND_LIST}
