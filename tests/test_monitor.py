"""The monitor's command table, QEMU's key=value syntax and the human monitor, on a real
machine that is assembled (KVM VM, memory, devices) but never booted."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from minivmm.errors import UserError
from minivmm.machine import Machine, MachineConfig
from minivmm.monitor.commands import COMMANDS, CommandError, dispatch
from minivmm.monitor.hmp import HMP_COMMANDS
from minivmm.monitor.keyval import Param, parse_keyval, split_options, typed
from minivmm.monitor.objects import specs_from_command_line
from minivmm.pmemfile import PmemSpec

MiB = 1 << 20


# -- key=value ------------------------------------------------------------------------------
def test_keyval_implied_key_and_doubled_commas() -> None:
    assert parse_keyval("memory-backend-file,id=m,mem-path=a,,b.img,size=4G", "qom-type") == {
        "qom-type": "memory-backend-file", "id": "m", "mem-path": "a,b.img", "size": "4G"}  # fmt: skip
    assert split_options("a,,,b") == ["a,", "b"]


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "empty option string"), ("a,b", "expected key=value"), ("x,id=1,id=2", "given twice"), ("x,=1", "bad parameter name")],
)
def test_keyval_errors(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_keyval(text, "driver")


def test_typed_sizes_and_booleans() -> None:
    params = (Param("size", "size"), Param("share", "bool"))
    assert typed(params, {"size": "4G", "share": "on", "x": "y"}) == {"size": 4 << 30, "share": True, "x": "y"}
    with pytest.raises(UserError, match="'size' expects a size"):
        typed(params, {"size": "4Q"})
    with pytest.raises(UserError, match="'share' expects 'on' or 'off'"):
        typed(params, {"share": "maybe"})


# -- a machine with one cold-plugged device -------------------------------------------------
@pytest.fixture
def machine(tmp_path: Path):
    cfg = MachineConfig(kernel=tmp_path / "never-booted", pmem=[PmemSpec(str(tmp_path / "p0.img"), 4 * MiB, "pmem0")])
    with Machine(cfg) as m:
        yield m


def run(machine: Machine, name: str, args: dict | None = None) -> object:
    return dispatch(machine.monitor, name, args or {})


def error(machine: Machine, name: str, args: dict | None = None) -> tuple[str, str]:
    with pytest.raises(CommandError) as info:
        run(machine, name, args)
    return info.value.cls, info.value.desc


def test_queries_describe_the_machine(machine: Machine) -> None:
    assert run(machine, "query-status") == {"status": "prelaunch", "running": False, "singlestep": False}
    devices = run(machine, "query-memory-devices")
    assert devices == [{"type": "virtio-pmem", "data": {"id": "pmem0", "memaddr": machine.pmem_plugged[0][0].start,
                                                         "size": 4 * MiB, "memdev": "/objects/pmem0"}}]  # fmt: skip
    (memdev,) = run(machine, "query-memdev")
    assert (memdev["id"], memdev["size"], memdev["share"], memdev["readonly"]) == ("pmem0", 4 * MiB, True, False)
    (bus,) = run(machine, "query-pci")
    slots = {d["slot"]: d for d in bus["devices"]}
    assert set(slots) == {0, 1} and slots[1]["qdev_id"] == "pmem0"
    assert slots[1]["id"]["vendor"] == 0x1AF4 and slots[1]["id"]["device"] == 0x1040 + 27  # virtio-pmem
    assert slots[1]["regions"][0]["mem_type_64"] and slots[1]["regions"][0]["size"] > 0
    assert {c["name"] for c in run(machine, "query-commands")} == set(COMMANDS)


@pytest.mark.parametrize(
    ("name", "args", "cls", "desc"),
    [
        ("no-such-command", {}, "CommandNotFound", "The command no-such-command has not been found"),
        ("object-del", {}, "GenericError", "Parameter 'id' is missing"),
        ("object-del", {"id": 7}, "GenericError", "Invalid parameter type for 'id', expected: string"),
        ("query-status", {"x": 1}, "GenericError", "Parameter 'x' is unexpected"),
        ("object-del", {"id": "nope"}, "GenericError", "object 'nope' not found"),
        ("object-del", {"id": "pmem0"}, "GenericError", "object 'pmem0' is in use by device 'pmem0' and cannot be deleted"),
        ("device_del", {"id": "nope"}, "DeviceNotFound", "Device 'nope' not found"),
        ("device_del", {"id": "pmem0"}, "GenericError",
         "virtio-pmem device 'pmem0' cannot be unplugged: hot-unplug of virtio-pmem is not supported"),
        ("object-add", {"qom-type": "memory-backend-ram", "id": "r"}, "GenericError",
         "Invalid parameter type for 'qom-type': minivmm knows only 'memory-backend-file'"),
        ("device_add", {"driver": "e1000"}, "GenericError",
         "'e1000' is not a valid device model name (minivmm has 'virtio-pmem-pci')"),
        ("device_add", {"driver": "virtio-pmem-pci", "memdev": "nope"}, "GenericError",
         "Device 'virtio-pmem-pci' can't find value 'nope' for property 'memdev'"),
        ("device_add", {"driver": "virtio-pmem-pci", "memdev": "pmem0"}, "GenericError",
         "can't use already busy memdev: pmem0 (used by 'pmem0')"),
        ("object-add", {"qom-type": "memory-backend-file", "id": "m", "mem-path": "x", "size": -1}, "GenericError",
         "Parameter 'size' expects a size from 1 byte to 512G"),
        ("object-add", {"qom-type": "memory-backend-file", "id": "m", "mem-path": "x", "size": 10**30}, "GenericError",
         "Parameter 'size' expects a size from 1 byte to 512G"),
        ("object-add", {"qom-type": "memory-backend-file", "id": "m 1", "mem-path": "x", "share": True}, "GenericError",
         "Parameter 'id' expects an identifier (letters, digits, '_', '.', '-'), not 'm 1'"),
    ],
)  # fmt: skip
def test_every_mistake_is_one_qemu_style_error_and_changes_nothing(machine, name, args, cls, desc) -> None:
    before = (run(machine, "query-memdev"), run(machine, "query-memory-devices"), run(machine, "query-pci"))
    assert error(machine, name, args) == (cls, desc)
    assert (run(machine, "query-memdev"), run(machine, "query-memory-devices"), run(machine, "query-pci")) == before


def test_object_add_follows_the_pmem_rules_and_object_del_closes_an_unused_backend(machine, tmp_path) -> None:
    img = tmp_path / "m1.img"
    props = {"qom-type": "memory-backend-file", "id": "m1", "mem-path": str(img), "size": 3 * MiB, "share": True}
    assert error(machine, "object-add", props)[1].endswith("size 3M is not a positive multiple of 2M")
    assert not img.exists()  # a refused command creates nothing
    run(machine, "object-add", dict(props, size=2 * MiB))
    assert img.stat().st_size == 2 * MiB
    assert error(machine, "object-add", dict(props, size=2 * MiB))[1] == (
        "attempt to add duplicate property 'm1' to object (type 'container')")
    same = dict(props, id="m2", size=2 * MiB)
    assert "same file as memory backend 'm1'" in error(machine, "object-add", same)[1]
    (m1,) = [b for b in run(machine, "query-memdev") if b["id"] == "m1"]
    assert m1["share"] is True
    private = {"qom-type": "memory-backend-file", "id": "m3", "mem-path": str(tmp_path / "new.img"), "size": 2 * MiB}
    assert "share=off (the default) maps an existing file privately" in error(machine, "object-add", private)[1]
    assert not (tmp_path / "new.img").exists()
    fd = machine.monitor.objects.backends["m1"].backing.fd
    run(machine, "object-del", {"id": "m1"})
    with pytest.raises(OSError):
        os.fstat(fd)  # the file is closed
    assert [b["id"] for b in run(machine, "query-memdev")] == ["pmem0"]


def test_readonly_backend_maps_read_only(machine, tmp_path) -> None:
    img = tmp_path / "ro.img"
    img.write_bytes(b"\xab" * (2 * MiB))
    run(machine, "object-add", {"qom-type": "memory-backend-file", "id": "ro", "mem-path": str(img), "readonly": True, "share": True})
    backing = machine.monitor.objects.backends["ro"].backing
    assert backing.readonly and backing.mapping[0] == 0xAB
    with pytest.raises(TypeError):
        backing.mapping[0] = 1  # PROT_READ: no write can reach the file
    assert error(machine, "object-add", {"qom-type": "memory-backend-file", "id": "ro2", "mem-path": str(tmp_path / "new.img"),
                                         "size": 2 * MiB, "readonly": True, "share": True})[1].endswith("readonly=on never creates one)")  # fmt: skip


def test_stop_and_cont_change_the_run_state_and_emit_events(machine) -> None:
    events: list[str] = []
    machine.add_event_listener(lambda name, data: events.append(name))
    machine.loops  # prelaunch: no vCPU thread yet, pausing still records the state
    run(machine, "stop")
    run(machine, "cont")
    assert events == ["STOP", "RESUME"]


# -- the human monitor ------------------------------------------------------------------------
def hmp(machine: Machine, line: str) -> str:
    return machine.monitor.hmp.execute(line)


def test_pmem_state_and_a_sticky_flush_failure_are_queryable(machine) -> None:
    (pmem,) = run(machine, "x-query-pmem")
    assert (pmem["id"], pmem["flush_requests"], pmem["flush_failed_errno"]) == ("pmem0", 0, 0)
    assert hmp(machine, "info pmem").endswith("0 flush requests, 0 host fsyncs, flushes ok\n")
    machine.pmem_plugged[0][0].fail_flushes(5, "fdatasync")
    assert run(machine, "x-query-pmem")[0]["flush_failed_errno"] == 5
    assert "FLUSHES FAILING (errno 5)" in hmp(machine, "info pmem")


def test_hmp_info_commands(machine) -> None:
    assert hmp(machine, "info status") == "VM status: prelaunch\n"
    assert 'Memory device [virtio-pmem]: "pmem0"\n  memaddr: 0x' in hmp(machine, "info memory-devices")
    assert hmp(machine, "info memdev").startswith("memory backend: pmem0\n  size: 4194304\n")
    assert 'id "pmem0"' in hmp(machine, "info pci") and "BAR0: 64 bit memory at 0x" in hmp(machine, "info pci")
    assert all(c.usage in hmp(machine, "help") for c in HMP_COMMANDS.values())
    info = hmp(machine, "info").splitlines()  # a bare `info` lists its subcommands, as QEMU does
    assert len(info) == sum(name.startswith("info ") for name in HMP_COMMANDS) and all(l.startswith("info ") for l in info)


def test_hmp_object_add_takes_the_seed_line_verbatim_with_size_suffixes(machine, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert hmp(machine, "object_add memory-backend-file,id=mem2,share=on,mem-path=virtio_pmem2.img,size=4M") == ""
    assert (tmp_path / "virtio_pmem2.img").stat().st_size == 4 * MiB
    assert "memory backend: mem2\n  size: 4194304\n" in hmp(machine, "info memdev")


@pytest.mark.parametrize(
    ("line", "output"),
    [
        ("frobnicate", "unknown command: 'frobnicate'\n"),
        ("info nothing", "unknown command: 'info nothing'\n"),
        ("object_add", "Error: missing argument: qom-type,key=value,...\n"),
        ("object_add memory-backend-file,id=x,size=4Q,mem-path=a", "Error: Parameter 'size' expects a size (bytes, with an optional K, M, G or T suffix)\n"),
        ("object_del a b", "Error: expected one argument: the id\n"),
        ("device_del pmem0", "Error: virtio-pmem device 'pmem0' cannot be unplugged: hot-unplug of virtio-pmem is not supported\n"),
        ("info status extra", "Error: unexpected argument 'extra'\n"),
        ("", ""),
    ],
)
def test_hmp_errors(machine, line: str, output: str) -> None:
    assert hmp(machine, line) == output


# -- the command line: --object / --device ----------------------------------------------------
def test_command_line_objects_and_devices_become_specs(tmp_path) -> None:
    existing = tmp_path / "b.img"
    existing.write_bytes(bytes(2 * MiB))
    specs = specs_from_command_line(
        ["memory-backend-file,id=m1,share=on,mem-path=a.img,size=4G", f"memory-backend-file,id=m2,mem-path={existing}"],
        ["virtio-pmem-pci,memdev=m1,id=nv1"],
    )
    assert specs == [
        PmemSpec("a.img", 4 << 30, "nv1", discard_writes=False, memdev="m1"),
        PmemSpec(str(existing), None, "m2", discard_writes=True, memdev="m2", plug=False),
    ]


@pytest.mark.parametrize(
    ("objects", "devices", "message"),
    [
        (["memory-backend-ram,id=r,size=1M"], [], "minivmm knows only 'memory-backend-file'"),
        (["memory-backend-file,mem-path=a"], [], "Parameter 'id' is missing"),
        (["memory-backend-file,id=a,mem-path=a,share=on", "memory-backend-file,id=a,mem-path=b"], [], "duplicate object id 'a'"),
        (["memory-backend-file,id=a,mem-path=a,colour=red"], [], "Property 'memory-backend-file.colour' not found"),
        (["memory-backend-file,id=a,mem-path=/nonexistent/a"], [], "share=off \\(the default\\) maps an existing file"),
        ([], ["virtio-pmem-pci,memdev=m"], "can't find value 'm' for property 'memdev'"),
        (["memory-backend-file,id=a,mem-path=a,share=on"], ["virtio-pmem-pci,memdev=a", "virtio-pmem-pci,memdev=a"],
         "already busy memdev: a"),
        ([], ["virtio-blk-pci,drive=x"], "'virtio-blk-pci' is not a valid device model name"),
        ([], ["virtio-pmem-pci"], "'memdev' property is not set"),
        (["memory-backend-file,id=a,mem-path=a,share=on,size=99999999999999999999G"], [], "expects a size from 1 byte"),
    ],
)
def test_command_line_mistakes(objects, devices, message) -> None:
    with pytest.raises(UserError, match=message):
        specs_from_command_line(objects, devices)


def test_device_add_plugs_a_backend_and_a_refused_one_changes_nothing(machine, tmp_path) -> None:
    run(machine, "object-add", {"qom-type": "memory-backend-file", "id": "m1", "share": True,
                                "mem-path": str(tmp_path / "m1.img"), "size": 2 * MiB})  # fmt: skip
    run(machine, "device_add", {"driver": "virtio-pmem-pci", "id": "nv1", "memdev": "m1"})
    devices = {d["data"]["id"]: d["data"] for d in run(machine, "query-memory-devices")}
    assert set(devices) == {"pmem0", "nv1"} and devices["nv1"]["memdev"] == "/objects/m1"
    assert {d["qdev_id"] for d in run(machine, "query-pci")[0]["devices"]} == {"host-bridge", "pmem0", "nv1"}
    assert error(machine, "device_add", {"driver": "virtio-pmem-pci", "id": "nv1", "memdev": "pmem0"})[1].startswith(
        "can't use already busy memdev")
    run(machine, "object-add", {"qom-type": "memory-backend-file", "id": "m2", "share": True,
                                "mem-path": str(tmp_path / "m2.img"), "size": 2 * MiB})  # fmt: skip
    assert error(machine, "device_add", {"driver": "virtio-pmem-pci", "id": "nv1", "memdev": "m2"}) == (
        "GenericError", "Duplicate device ID 'nv1'")
    for n in range(2, 31):  # fill PCI bus 0 (31 slots: pmem0, nv1 and these)
        run(machine, "object-add", {"qom-type": "memory-backend-file", "id": f"f{n}", "share": True,
                                    "mem-path": str(tmp_path / f"f{n}.img"), "size": 2 * MiB})  # fmt: skip
        run(machine, "device_add", {"driver": "virtio-pmem-pci", "id": f"d{n}", "memdev": f"f{n}"})
    before = run(machine, "query-memory-devices")
    cls, desc = error(machine, "device_add", {"driver": "virtio-pmem-pci", "id": "late", "memdev": "m2"})
    assert (cls, desc) == ("GenericError", "late: PCI bus 0 is full (at most 31 devices)")
    assert run(machine, "query-memory-devices") == before
    assert machine.monitor.objects.backends["m2"].backing.id == "m2" and machine.monitor.objects.backends["m2"].user is None


def test_a_device_thread_error_reaches_the_statistics(machine) -> None:
    device, _ = machine.pmem_plugged[0]
    device.errors.append(RuntimeError("boom"))  # what report_thread_error keeps
    stats = machine.statistics()
    assert stats.thread_errors == ["pmem0 flusher: RuntimeError: boom"]
    assert "thread error: pmem0 flusher: RuntimeError: boom" in stats.render_text()
