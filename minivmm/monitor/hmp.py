"""The human monitor: QEMU's HMP syntax over the same command table as QMP.

``object_add memory-backend-file,id=mem2,share=on,mem-path=img,size=4G`` becomes QMP
``object-add`` with typed arguments (`keyval`); ``info status`` becomes ``query-status`` and
its result is printed the way QEMU's HMP prints it. An error prints ``Error: <desc>``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import UserError
from .commands import CommandError, dispatch
from .keyval import Param, parse_keyval, typed

if TYPE_CHECKING:
    from .monitor import Monitor

Formatter = Callable[[object], str]
# Typed properties of object_add/device_add given as text (everything else stays a string).
OBJECT_PARAMS = (
    Param("size", "size"), Param("share", "bool"), Param("readonly", "bool"), Param("discard-writes", "bool"),
    Param("lose-unflushed", "bool"),
)  # fmt: skip


@dataclass(frozen=True)
class HmpCommand:
    """An HMP command: how its argument text becomes QMP arguments, and how the result prints."""

    qmp: str
    usage: str
    help: str
    args: Callable[[str], dict[str, object]] = lambda text: _no_args(text)
    show: Formatter = lambda result: ""


def _no_args(text: str) -> dict[str, object]:
    if text.strip():
        raise UserError(f"unexpected argument {text.strip()!r}")
    return {}


def _one_id(text: str) -> dict[str, object]:
    words = shlex.split(text)
    if len(words) != 1:
        raise UserError("expected one argument: the id")
    return {"id": words[0]}


def _keyval(implied: str) -> Callable[[str], dict[str, object]]:
    def parse(text: str) -> dict[str, object]:
        if not text.strip():
            raise UserError(f"missing argument: {implied},key=value,...")
        return typed(OBJECT_PARAMS, parse_keyval(text.strip(), implied))

    return parse


def _show_status(r: object) -> str:
    assert isinstance(r, dict)
    return f"VM status: {r['status']}\n"


def _show_memory_devices(r: object) -> str:
    assert isinstance(r, list)
    out = []
    for dev in r:
        d = dev["data"]
        out.append(f'Memory device [{dev["type"]}]: "{d["id"]}"\n  memaddr: {d["memaddr"]:#x}\n  size: {d["size"]}\n'
                   f'  memdev: {d["memdev"]}\n')  # fmt: skip
    return "".join(out)


def _show_memdev(r: object) -> str:
    assert isinstance(r, list)
    keys = ("size", "merge", "dump", "prealloc", "share", "readonly", "policy")
    return "".join(
        f"memory backend: {b['id']}\n" + "".join(f"  {k}: {str(b[k]).lower()}\n" for k in keys) for b in r
    )


def _show_pci(r: object) -> str:
    assert isinstance(r, list)
    out = []
    for bus in r:
        for d in bus["devices"]:
            out.append(f"  Bus {d['bus']:2d}, device {d['slot']:3d}, function {d['function']}:\n"
                       f"    class {d['class_info']['class']:04x}: PCI device {d['id']['vendor']:04x}:{d['id']['device']:04x}\n"
                       f"      id \"{d['qdev_id']}\"\n")  # fmt: skip
            for reg in d["regions"]:
                kind = "64 bit" if reg["mem_type_64"] else "32 bit"
                pf = " prefetchable" if reg["prefetch"] else ""
                out.append(f"      BAR{reg['bar']}: {kind}{pf} memory at {reg['address']:#x} [{reg['address'] + reg['size'] - 1:#x}].\n")
    return "".join(out)


def _show_pmem(r: object) -> str:
    assert isinstance(r, list)
    out = []
    for d in r:
        state = f"FLUSHES FAILING (errno {d['flush_failed_errno']})" if d["flush_failed_errno"] else "flushes ok"
        out.append(f"{d['id']} ({d['path']}): {d['flush_requests']} flush requests, {d['host_fsyncs']} host fsyncs, {state}\n")
    return "".join(out)


def _show_version(r: object) -> str:
    assert isinstance(r, dict)
    q = r["qemu"]
    return f"{q['major']}.{q['minor']}.{q['micro']} ({r['package']})\n"


HMP_COMMANDS: dict[str, HmpCommand] = {
    "object_add": HmpCommand("object-add", "object_add memory-backend-file,id=ID,mem-path=PATH[,size=SIZE][,share=on][,readonly=on][,lose-unflushed=on]",
                             "add a memory backend", _keyval("qom-type")),
    "object_del": HmpCommand("object-del", "object_del ID", "remove an unused memory backend", _one_id),
    "device_add": HmpCommand("device_add", "device_add virtio-pmem-pci,memdev=ID[,id=ID]", "hot-add a virtio-pmem-pci device",
                             _keyval("driver")),
    "device_del": HmpCommand("device_del", "device_del ID", "refused: virtio-pmem cannot be unplugged", _one_id),
    "info status": HmpCommand("query-status", "info status", "whether the guest runs", show=_show_status),
    "info pci": HmpCommand("query-pci", "info pci", "PCI bus 0", show=_show_pci),
    "info memory-devices": HmpCommand("query-memory-devices", "info memory-devices", "virtio-pmem devices",
                                      show=_show_memory_devices),
    "info memdev": HmpCommand("query-memdev", "info memdev", "memory backends", show=_show_memdev),
    "info pmem": HmpCommand("x-query-pmem", "info pmem", "virtio-pmem flush counters and failures", show=_show_pmem),
    "info version": HmpCommand("query-version", "info version", "minivmm's version", show=_show_version),
    "system_powerdown": HmpCommand("system_powerdown", "system_powerdown", "press the ACPI power button"),
    "system_reset": HmpCommand("system_reset", "system_reset", "reset (minivmm ends the run, as a guest reboot does)"),
    "stop": HmpCommand("stop", "stop", "pause every vCPU"),
    "cont": HmpCommand("cont", "cont", "resume every vCPU"),
    "quit": HmpCommand("quit", "quit", "end the run"),
    "power_cut": HmpCommand("x-power-cut", "power_cut", "cut the power: unflushed pmem writes are lost",
                            show=lambda r: f"power cut: {r['dropped-pages']} dirty page(s) dropped\n"),  # type: ignore[index]
}  # fmt: skip


def help_text(prefix: str = "") -> str:
    """The command list (QEMU's `help`); with `prefix` "info", only the info subcommands
    (what QEMU prints for a bare `info`)."""
    commands = [c for name, c in HMP_COMMANDS.items() if name.startswith(prefix)]
    width = max(len(c.usage) for c in HMP_COMMANDS.values())
    lines = [f"{c.usage:<{width}}  -- {c.help}" for c in commands]
    if not prefix:
        lines.append(f"{'help':<{width}}  -- this list")
    return "\n".join(lines) + "\n"


class HumanMonitor:
    """Runs HMP command lines against the command table; returns what QEMU would print."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def execute(self, line: str) -> str:
        line = line.strip()
        if not line:
            return ""
        if line in ("help", "?") or line.startswith("help "):
            return help_text()
        if line == "info":
            return help_text("info ")
        words = line.split(None, 2)
        name = " ".join(words[:2]) if words[0] == "info" and len(words) > 1 else words[0]
        rest = line[len(name) :]
        command = HMP_COMMANDS.get(name)
        if command is None:
            return f"unknown command: '{name}'\n"
        try:
            result = dispatch(self.monitor, command.qmp, command.args(rest))
        except CommandError as exc:
            return f"Error: {exc.desc}\n"
        except UserError as exc:
            return f"Error: {exc}\n"
        return command.show(result)
