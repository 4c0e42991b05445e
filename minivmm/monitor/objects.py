"""The machine's user-creatable objects and devices, as QEMU's monitor sees them.

A memory backend (``memory-backend-file``, qapi/qom.json MemoryBackendFileProperties) is an
opened backing file; a ``virtio-pmem-pci`` device (qapi/machine.json VirtioPMEMDeviceInfo)
plugs one backend into PCI bus 0. ``--pmem PATH,id=ID`` is both at once (backend and device
named ID). Every rule of ``--pmem`` holds for ``object-add``: `pmemfile` opens the file.
Hot-unplug is refused, as QEMU refuses it for virtio-pmem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .. import pmemfile
from ..errors import UserError
from ..units import format_size
from ..pci.pci_regs import PCI_CLASS_DEVICE, PCI_DEVICE_ID, PCI_SUBSYSTEM_ID, PCI_SUBSYSTEM_VENDOR_ID, PCI_VENDOR_ID
from ..pmemfile import PmemBacking, PmemSpec
from .commands import DEVICE_NOT_FOUND, CommandError

if TYPE_CHECKING:
    from ..machine import Machine

MEMORY_BACKEND_FILE = "memory-backend-file"
VIRTIO_PMEM_PCI = "virtio-pmem-pci"
# object-add's memory-backend-file properties: QEMU's, then minivmm's own.
BACKEND_PROPERTIES = {"qom-type", "id", "mem-path", "size", "share", "readonly", "discard-writes", "lose-unflushed", "flush-log"}
DEVICE_PROPERTIES = {"driver", "id", "memdev"}
MAX_BACKEND_SIZE = 1 << 39  # the guest-physical address limit: no larger backend can ever be plugged


@dataclass
class MemoryBackend:
    id: str
    backing: PmemBacking
    share: bool
    user: str | None = None  # the id of the device that uses it


@dataclass
class PmemDevice:
    id: str
    memdev: str
    gpa: int
    size: int


def spec_from_object(props: dict[str, object]) -> PmemSpec:
    """A `PmemSpec` from memory-backend-file properties (object-add, --object): `share=off`
    (QEMU's default) maps the file privately, so the guest's writes never reach it."""
    unknown = sorted(set(props) - BACKEND_PROPERTIES)
    if unknown:
        raise UserError(f"Property '{MEMORY_BACKEND_FILE}.{unknown[0]}' not found")
    if "mem-path" not in props:
        raise UserError("Parameter 'mem-path' is missing")
    for key in ("share", "readonly", "discard-writes", "lose-unflushed"):
        if not isinstance(props.get(key, False), bool):
            raise UserError(f"Parameter '{key}' expects a boolean")
    size = props.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_BACKEND_SIZE):
        raise UserError(f"Parameter 'size' expects a size from 1 byte to {format_size(MAX_BACKEND_SIZE)}")
    if not pmemfile.valid_id(str(props["id"])):
        raise UserError(f"Parameter 'id' expects an identifier (letters, digits, '_', '.', '-'), not {props['id']!r}")
    share = bool(props.get("share", False))
    ident = str(props["id"])
    if props.get("lose-unflushed") and not share:
        raise UserError("lose-unflushed=on needs share=on (share=off never writes the file at all)")
    if not share and not os.path.exists(str(props["mem-path"])):
        raise UserError(
            f"mem-path {props['mem-path']} does not exist: share=off (the default) maps an existing file privately "
            "and minivmm never creates a file whose writes are discarded; give share=on to create it"
        )
    spec = PmemSpec(
        path=str(props["mem-path"]),
        size=size,
        id=ident,
        discard_writes=not share or bool(props.get("discard-writes", False)),
        readonly=bool(props.get("readonly", False)),
        memdev=ident,
        lose_unflushed=bool(props.get("lose-unflushed", False)),
        flush_log=None if props.get("flush-log") is None else str(props["flush-log"]),
    )
    pmemfile.check_powerfail_options(spec, f"{MEMORY_BACKEND_FILE} '{ident}'")
    return spec


def check_qom_type(props: dict[str, object]) -> None:
    if props.get("qom-type") != MEMORY_BACKEND_FILE:
        raise UserError(f"Invalid parameter type for 'qom-type': minivmm knows only '{MEMORY_BACKEND_FILE}'")


def check_device(props: dict[str, object]) -> None:
    if props.get("driver") != VIRTIO_PMEM_PCI:
        raise UserError(f"'{props.get('driver')}' is not a valid device model name (minivmm has '{VIRTIO_PMEM_PCI}')")
    unknown = sorted(set(props) - DEVICE_PROPERTIES)
    if unknown:
        raise UserError(f"Property '{VIRTIO_PMEM_PCI}.{unknown[0]}' not found")
    if "memdev" not in props:
        raise UserError("'memdev' property is not set")


class MachineObjects:
    """Backends and devices of a machine, for the monitor (one lock: the monitor's thread)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.backends: dict[str, MemoryBackend] = {}
        self.devices: dict[str, PmemDevice] = {}
        for spec, backing in zip(machine.config.pmem, machine.pmem_backings):
            memdev = spec.memdev or backing.id
            if memdev in self.backends:
                raise UserError(f"id '{memdev}' names two memory backends (a --pmem id and an --object id)")
            self.backends[memdev] = MemoryBackend(memdev, backing, share=not spec.discard_writes)
        for device, backing in machine.pmem_plugged:
            memdev = next(b.id for b in self.backends.values() if b.backing is backing)
            self.backends[memdev].user = device.name
            self.devices[device.name] = PmemDevice(device.name, memdev, device.start, device.size)

    # -- object-add / object-del ------------------------------------------------------------
    def object_add(self, props: dict[str, object]) -> None:
        check_qom_type(props)
        ident = str(props["id"])
        if ident in self.backends:
            raise UserError(f"attempt to add duplicate property '{ident}' to object (type 'container')")
        spec = spec_from_object(props)
        self._refuse_open_file(spec.path)
        backing = pmemfile.open_all([spec])[0]
        self.machine.owned.callback(backing.close)
        self.backends[ident] = MemoryBackend(ident, backing, share="share" in props and bool(props["share"]))

    def _refuse_open_file(self, path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return  # a new file cannot be open already; pmemfile reports other errors
        for b in self.backends.values():
            other = os.fstat(b.backing.fd)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                raise UserError(f"--pmem {path}: same file as memory backend '{b.id}' ({b.backing.path})")

    def object_del(self, ident: str) -> None:
        backend = self.backends.get(ident)
        if backend is None:
            raise UserError(f"object '{ident}' not found")
        if backend.user is not None:
            raise UserError(f"object '{ident}' is in use by device '{backend.user}' and cannot be deleted")
        del self.backends[ident]
        backend.backing.close()

    # -- device_add / device_del ------------------------------------------------------------
    def device_add(self, props: dict[str, object]) -> None:
        check_device(props)
        memdev = str(props["memdev"])
        backend = self.backends.get(memdev)
        if backend is None:
            raise UserError(f"Device '{VIRTIO_PMEM_PCI}' can't find value '{memdev}' for property 'memdev'")
        if backend.user is not None:
            raise UserError(f"can't use already busy memdev: {memdev} (used by '{backend.user}')")
        ident = str(props.get("id") or self._next_id())
        if not pmemfile.valid_id(ident):
            raise UserError(f"Parameter 'id' expects an identifier (letters, digits, '_', '.', '-'), not {ident!r}")
        if ident in self.devices:
            raise UserError(f"Duplicate device ID '{ident}'")
        memdev_id, backend.backing.id = backend.backing.id, ident  # the function, region and stats carry the device id
        try:
            device = self.machine.hotplug_pmem(backend.backing)
        except BaseException:
            backend.backing.id = memdev_id  # refused: nothing changed
            raise
        backend.user = ident
        self.devices[ident] = PmemDevice(ident, memdev, device.start, device.size)

    def _next_id(self) -> str:
        n = len(self.devices)
        while f"pmem{n}" in self.devices:
            n += 1
        return f"pmem{n}"

    def device_del(self, ident: str) -> None:
        if ident not in self.devices:
            raise CommandError(DEVICE_NOT_FOUND, f"Device '{ident}' not found")
        raise UserError(f"virtio-pmem device '{ident}' cannot be unplugged: hot-unplug of virtio-pmem is not supported")

    # -- queries ----------------------------------------------------------------------------
    def query_memory_devices(self) -> list[dict[str, object]]:
        """qapi/machine.json MemoryDeviceInfo, kind virtio-pmem."""
        return [
            {"type": "virtio-pmem", "data": {"id": d.id, "memaddr": d.gpa, "size": d.size, "memdev": f"/objects/{d.memdev}"}}
            for d in self.devices.values()
        ]

    def query_memdev(self) -> list[dict[str, object]]:
        """qapi/machine.json Memdev."""
        return [
            {"id": b.id, "size": b.backing.size, "merge": False, "dump": True, "prealloc": False, "share": b.share,
             "host-nodes": [], "policy": "default", "readonly": b.backing.readonly}
            for b in self.backends.values()
        ]  # fmt: skip

    def query_pci(self) -> list[dict[str, object]]:
        """qapi/pci.json PciInfo: bus 0 and its functions."""
        devices = []
        for slot, fn in sorted(self.machine.pci.devices.items()):
            cfg = fn.config
            regions = [
                {"bar": bar.index, "type": "memory", "address": cfg.bar_address(bar.index), "size": bar.size,
                 "prefetch": bar.prefetchable, "mem_type_64": bar.mem64}
                for bar in sorted(cfg.bars.values(), key=lambda b: b.index)
            ]  # fmt: skip
            devices.append({
                "bus": 0, "slot": slot, "function": 0,
                "class_info": {"class": cfg.get(PCI_CLASS_DEVICE, 2)},
                "id": {"vendor": cfg.get(PCI_VENDOR_ID, 2), "device": cfg.get(PCI_DEVICE_ID, 2),
                       "subsystem-vendor": cfg.get(PCI_SUBSYSTEM_VENDOR_ID, 2), "subsystem": cfg.get(PCI_SUBSYSTEM_ID, 2)},
                "regions": regions, "qdev_id": fn.name,
            })  # fmt: skip
        return [{"bus": 0, "devices": devices}]


def specs_from_command_line(objects: list[str], devices: list[str]) -> list[PmemSpec]:
    """``--object``/``--device`` options (QEMU's syntax, `keyval`) -> pmem specs, in device
    order, then the objects no device uses (opened but not plugged, as QEMU does)."""
    from .hmp import OBJECT_PARAMS
    from .keyval import parse_keyval, typed

    specs: dict[str, PmemSpec] = {}
    for text in objects:
        props = typed(OBJECT_PARAMS, parse_keyval(text, "qom-type"))
        check_qom_type(props)
        if "id" not in props:
            raise UserError(f"--object {text}: Parameter 'id' is missing")
        if props["id"] in specs:
            raise UserError(f"--object {text}: duplicate object id '{props['id']}'")
        specs[str(props["id"])] = spec_from_object(props)
    plugged: list[PmemSpec] = []
    used: dict[str, str] = {}
    for text in devices:
        props = dict(parse_keyval(text, "driver"))
        check_device(props)
        memdev = str(props["memdev"])
        if memdev not in specs:
            raise UserError(f"--device {text}: Device '{VIRTIO_PMEM_PCI}' can't find value '{memdev}' for property 'memdev'")
        if memdev in used:
            raise UserError(f"--device {text}: can't use already busy memdev: {memdev}")
        used[memdev] = text
        plugged.append(replace(specs[memdev], id=props.get("id")))
    unplugged = [replace(spec, plug=False) for memdev, spec in specs.items() if memdev not in used]
    return plugged + unplugged
