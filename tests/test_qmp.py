"""QMP: the protocol (`QmpSession`), the socket server with the real `qemu.qmp` client, and a
fuzz of the input stream; on a real machine that is assembled but never booted."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError, QMPClient

from minivmm.errors import UserError
from minivmm.machine import Machine, MachineConfig
from minivmm.monitor.commands import COMMANDS
from minivmm.monitor.qmp import MAX_INPUT, QmpServer, QmpSession, listen_unix, parse_qmp_path, value_end

MiB = 1 << 20


@pytest.fixture
def machine(tmp_path: Path):
    with Machine(MachineConfig(kernel=tmp_path / "never-booted")) as m:
        yield m


class Wire:
    """A session whose replies are collected."""

    def __init__(self, machine: Machine) -> None:
        self.out: list[dict] = []
        self.session = QmpSession(machine.monitor, self.out.append)

    def send(self, text: str) -> list[dict]:
        self.out.clear()
        self.session.feed(text)
        return list(self.out)

    def negotiate(self) -> None:
        assert self.send('{"execute": "qmp_capabilities"}') == [{"return": {}}]


@pytest.fixture
def wire(machine):
    return Wire(machine)


def test_greeting_advertises_no_capabilities(wire) -> None:
    greeting = wire.session.greeting()
    assert greeting["QMP"]["capabilities"] == []
    assert set(greeting["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}


def test_capabilities_negotiation_first_and_only_once(wire) -> None:
    expecting = "Expecting capabilities negotiation with 'qmp_capabilities'"
    assert wire.send('{"execute": "query-status", "id": 1}') == [{"error": {"class": "CommandNotFound", "desc": expecting}, "id": 1}]
    assert wire.send('{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}') == [
        {"error": {"class": "GenericError", "desc": "Capability 'oob' not available"}}]  # fmt: skip
    wire.negotiate()
    assert wire.send('{"execute": "qmp_capabilities"}') == [
        {"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}]  # fmt: skip


@pytest.mark.parametrize("ident", ['"abc"', "7", "[1, {\"a\": null}]", '{"x": 1.5}', "null", "false"])
def test_id_is_echoed_verbatim(wire, ident: str) -> None:
    wire.negotiate()
    (reply,) = wire.send(f'{{"execute": "query-status", "id": {ident}}}')
    assert reply["id"] == json.loads(ident) and reply["return"]["status"] == "prelaunch"
    (reply,) = wire.send(f'{{"execute": "nope", "id": {ident}}}')
    assert reply["id"] == json.loads(ident) and reply["error"]["class"] == "CommandNotFound"


@pytest.mark.parametrize(
    ("text", "desc"),
    [
        ("[1, 2]", "QMP input must be a JSON object"),
        ("42\n", "QMP input must be a JSON object"),  # a number ends at whitespace
        ('{"arguments": {}}', "QMP input lacks member 'execute'"),
        ('{"execute": 1}', "QMP input member 'execute' must be a string"),
        ('{"execute": "stop", "foo": 1}', "QMP input member 'foo' is unexpected"),
        ('{"exec-oob": "stop"}', "QMP input member 'exec-oob' is unexpected (out-of-band execution is not enabled)"),
        ('{"execute": "stop", "arguments": [1]}', "QMP input member 'arguments' must be an object"),
    ],
)
def test_malformed_requests_are_generic_errors(wire, text: str, desc: str) -> None:
    wire.negotiate()
    assert wire.send(text) == [{"error": {"class": "GenericError", "desc": desc}}]


def test_malformed_json_is_answered_and_the_session_goes_on(wire) -> None:
    wire.negotiate()
    (bad,) = wire.send('{"execute": nonsense}\n')
    assert bad["error"]["class"] == "GenericError" and bad["error"]["desc"].startswith("JSON parse error")
    assert wire.send('{"execute": "query-status", "id": 2}')[0]["id"] == 2
    (bad,) = wire.send("NaN ")
    assert bad["error"]["desc"].startswith("JSON parse error")


def test_values_split_across_reads_and_pipelined_without_separators(wire) -> None:
    wire.negotiate()
    assert wire.send('{"execute": "query-st') == []
    assert wire.send('atus", "id": "a"}{"execute": "query-status", "id": "b"}{"exe') == [
        {"return": {"status": "prelaunch", "running": False, "singlestep": False}, "id": "a"},
        {"return": {"status": "prelaunch", "running": False, "singlestep": False}, "id": "b"},
    ]
    assert wire.send('cute": "query-version", "id": "}{"}')[0]["id"] == "}{"  # brackets inside strings


def test_one_answer_per_stretch_of_garbage_and_no_infinity_in_a_reply(wire) -> None:
    wire.negotiate()
    (err,) = wire.send("not json at all " + "z" * 70_000 + " ")
    assert err["error"]["desc"].startswith("JSON parse error")
    assert wire.send('{"execute": "query-status", "id": 4}')[0]["id"] == 4
    (err,) = wire.send('{"execute": "query-status", "id": 1e999999}')
    assert err["error"]["desc"].startswith("JSON parse error") and "id" not in err
    assert json.dumps(err, allow_nan=False)


def test_input_is_bounded(wire) -> None:
    wire.negotiate()
    assert wire.send('{"execute": "' + "x" * (MAX_INPUT // 2)) == []  # may still complete
    (err,) = wire.send("y" * MAX_INPUT)
    assert err["error"]["desc"] == f"JSON parse error, input exceeds {MAX_INPUT} bytes"
    assert wire.send("y" * MAX_INPUT) == []  # the rest of the same value: dropped, not answered again
    assert wire.send('"}\n{"execute": "query-status", "id": 3}')[0]["id"] == 3


def test_value_end() -> None:
    assert value_end('{"a": "}"} x') == 10
    assert value_end('{"a": "\\"}"}') == 12
    assert value_end("[[]") is None and value_end("tru") is None and value_end("true ") == 4 and value_end("}") == 1
    assert value_end('{"a":\n') == 6  # a value never spans a line


# -- the fuzz: nothing a client sends escapes as an exception, every reply is well formed ---------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
SAFE_COMMANDS = sorted(set(COMMANDS) - {"quit", "system_reset", "system_powerdown"})  # those end or signal the run
ARGUMENT_NAMES = st.sampled_from(["id", "qom-type", "mem-path", "size", "share", "driver", "memdev", "readonly",
                                  "command-line", "enable", "x"])  # fmt: skip


def well_formed(reply: dict) -> bool:
    if "return" in reply:
        return set(reply) <= {"return", "id"}
    err = reply.get("error")
    return (set(reply) <= {"error", "id"} and isinstance(err, dict) and set(err) == {"class", "desc"}
            and isinstance(err["class"], str) and isinstance(err["desc"], str))  # fmt: skip


def check_stream(machine: Machine, chunks: list[str]) -> None:
    w = Wire(machine)
    w.negotiate()
    for chunk in chunks:
        for reply in w.send(chunk):
            assert well_formed(reply), reply
    # Still serving: a newline ends whatever was left open, the next line is a fresh request.
    replies = w.send('\n{"execute": "query-status", "id": "end"}\n')
    assert all(well_formed(r) for r in replies) and replies[-1]["id"] == "end", replies


FUZZ = settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_fuzz_random_bytes(machine, chunks) -> None:
    check_stream(machine, [c.decode("utf-8", errors="replace") for c in chunks])


@FUZZ
@given(st.lists(JSON, max_size=4))
def test_fuzz_random_json(machine, values) -> None:
    check_stream(machine, [json.dumps(v) for v in values])


@FUZZ
@given(st.lists(st.fixed_dictionaries({"execute": st.sampled_from(SAFE_COMMANDS)},
                                      optional={"arguments": st.dictionaries(ARGUMENT_NAMES, JSON, max_size=4), "id": JSON}),
                max_size=4))  # fmt: skip
def test_fuzz_valid_commands_with_wrong_arguments(machine, tmp_path_factory, requests) -> None:
    os.chdir(tmp_path_factory.mktemp("fuzz"))  # an object-add that succeeds creates its file here
    check_stream(machine, [json.dumps(r) for r in requests])


@FUZZ
@given(st.lists(st.text(alphabet='{}[]",:\\ \nabcetux0123', max_size=40), max_size=6))
def test_fuzz_bracket_soup(machine, chunks) -> None:
    check_stream(machine, chunks)


# -- the socket, with the real client --------------------------------------------------------
@pytest.fixture
def server(machine, tmp_path):
    path = str(tmp_path / "qmp.sock")
    srv = QmpServer(listen_unix(path), machine.monitor, path)
    srv.start()
    yield srv
    srv.close()


def test_qemu_qmp_client_works_against_the_server(server, machine) -> None:
    async def session() -> list[object]:
        client = QMPClient("test")
        await client.connect(server.path)
        out = [await client.execute("query-status"), await client.execute("query-commands")]
        try:
            await client.execute("device_del", {"id": "x"})
        except ExecuteError as exc:
            out.append(exc.error_class)
        waiter = asyncio.ensure_future(client.events.get())
        await client.execute("stop")
        event = await asyncio.wait_for(waiter, 5)
        out.append((event["event"], sorted(event["timestamp"])))
        await client.disconnect()
        return out

    status, commands, error_class, event = asyncio.run(session())
    assert status["status"] == "prelaunch"
    assert {c["name"] for c in commands} == set(COMMANDS)
    assert error_class == "DeviceNotFound" and event == ("STOP", ["microseconds", "seconds"])


def raw_client(path: str) -> tuple[socket.socket, dict]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    return s, json.loads(s.makefile().readline())


def test_one_client_at_a_time_and_a_client_leaving_mid_command_changes_nothing(server) -> None:
    first, greeting = raw_client(server.path)
    assert "QMP" in greeting
    second = socket.socket(socket.AF_UNIX)
    second.settimeout(0.5)
    second.connect(server.path)  # queued in the backlog: no greeting while the first is served
    with pytest.raises(socket.timeout):
        second.recv(1)
    first.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-st')  # leaves mid-command
    first.close()
    second.settimeout(5)
    reader = second.makefile()
    assert "QMP" in json.loads(reader.readline())  # served once the first left
    second.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status", "id": 1}\n')
    lines = reader.readline(), reader.readline()
    second.close()
    assert json.loads(lines[0]) == {"return": {}}
    assert json.loads(lines[1]) == {"return": {"status": "prelaunch", "running": False, "singlestep": False}, "id": 1}


def test_socket_is_owner_only_and_never_replaces_a_file(tmp_path, machine) -> None:
    path = tmp_path / "qmp.sock"
    sock = listen_unix(str(path))
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    sock.close()
    listen_unix(str(path)).close()  # a stale socket is replaced
    live = listen_unix(str(path))
    with pytest.raises(UserError, match="in use: another process serves this socket"):
        listen_unix(str(path))  # another minivmm's live socket is never taken over
    live.close()
    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    with pytest.raises(UserError, match="exists and is not a socket; refusing to replace it"):
        listen_unix(str(regular))
    assert regular.read_text() == "keep me"


@pytest.mark.parametrize(
    ("text", "path"),
    [("/run/q.sock", "/run/q.sock"), ("unix:/run/q.sock,server=on,wait=off", "/run/q.sock"), ("unix:q.sock,server,nowait", "q.sock")],
)
def test_qmp_option_spellings(text: str, path: str) -> None:
    assert parse_qmp_path(text) == path


@pytest.mark.parametrize("text", ["tcp:localhost:4444", "unix:/q.sock,server=on,wait=on", "unix:", "unix:/q,server=off"])
def test_qmp_option_refused(text: str) -> None:
    with pytest.raises(UserError):
        parse_qmp_path(text)
