"""QMP, the QEMU Machine Protocol, on a UNIX socket (QEMU docs/interop/qmp-spec.rst).

The server greets (``{"QMP": {"version": ..., "capabilities": []}}``), requires
``qmp_capabilities`` before anything else (``CommandNotFound`` otherwise, and for a second
one), runs ``{"execute": NAME, "arguments": {...}, "id": ANY}`` through the command table and
answers ``{"return": ...}`` or ``{"error": {"class", "desc"}}`` with the ``id`` echoed
verbatim, and sends asynchronous events ``{"event", "data", "timestamp"}`` once negotiated.

Robustness (a client must never hurt the guest): one client at a time (others wait in the
listen backlog), input bounded to `MAX_INPUT` bytes without a complete JSON value, malformed
JSON answered with a ``GenericError`` and the connection kept, a client that disconnects
mid-command changes nothing else. The socket is created owner-only; an existing path is
replaced only if it is a socket.
"""

from __future__ import annotations

import codecs
import json
import os
import socket
import stat
import threading
import time
from typing import Callable

from ..errors import UserError, report_thread_error
from .commands import COMMAND_NOT_FOUND, GENERIC_ERROR, CommandError, dispatch
from .monitor import Monitor

MAX_INPUT = 64 * 1024  # bytes of one pending JSON value
_decoder = json.JSONDecoder(parse_constant=lambda name: _reject(name), parse_float=lambda text: _finite(text))
REQUEST_MEMBERS = {"execute", "arguments", "id"}


def _reject(name: str) -> object:
    raise ValueError(f"invalid JSON value {name}")


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} out of range")
    return value


def parse_qmp_path(text: str) -> str:
    """``PATH`` or QEMU's ``unix:PATH,server=on,wait=off`` (``server``/``wait`` as QEMU
    spells them, on/off); other forms are a UserError."""
    if not text:
        raise UserError("--qmp: empty socket path")
    if not text.startswith("unix:"):
        if "," in text or ":" in text.split("/")[0]:
            raise UserError(f"--qmp {text!r}: expected a socket path or unix:PATH,server=on,wait=off")
        return text
    path, *opts = text[len("unix:") :].split(",")
    for opt in opts:
        key, _, value = opt.partition("=")
        if (key, value) not in (("server", "on"), ("server", ""), ("wait", "off"), ("nowait", "")):
            raise UserError(f"--qmp {text!r}: minivmm listens as a server without waiting (server=on,wait=off); got {opt!r}")
    if not path:
        raise UserError(f"--qmp {text!r}: empty socket path")
    return path


def listen_unix(path: str) -> socket.socket:
    """An owner-only listening socket at `path`; an existing socket there is replaced, any
    other file is refused (UserError)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise UserError(f"--qmp {path}: {exc.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise UserError(f"--qmp {path}: exists and is not a socket; refusing to replace it")
        if _someone_listens(path):
            raise UserError(f"--qmp {path}: in use: another process serves this socket")
        os.unlink(path)  # a stale socket of a process that is gone
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)  # owner-only from the first moment the path exists
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise UserError(f"--qmp {path}: cannot listen: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    sock.listen(4)
    return sock


def value_end(text: str) -> int | None:
    """Where the first JSON value of `text` (no leading whitespace) ends, or None while it
    may still be incomplete. An object or array ends at its matching bracket (outside
    strings); anything else ends at the next whitespace or bracket. A value may not span a
    line: an object still open at a newline ends there (and fails to parse), so a client
    that sent garbage gets an error and its next line is read afresh."""
    if not text:
        return None
    if text[0] in "{[":
        depth, in_string, escaped = 0, False, False
        for i, ch in enumerate(text):
            if ch == "\n":
                return i + 1
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
        return None
    if text[0] in "}]":
        return 1
    for i, ch in enumerate(text):
        if ch.isspace() or ch in "{}[]":
            return i
    return None


def _someone_listens(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def timestamp() -> dict[str, int]:
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}


class QmpSession:
    """The protocol state of one connection, independent of sockets (`feed` bytes in,
    `send` what goes out): so the whole protocol is testable and fuzzable without a socket."""

    def __init__(self, monitor: Monitor, send: Callable[[dict[str, object]], None]) -> None:
        self.monitor = monitor
        self.send = send
        self.negotiated = False
        self._buffer = ""
        self._skipping = False  # after an error, input up to the next "{" is dropped unanswered

    def greeting(self) -> dict[str, object]:
        version = dispatch(self.monitor, "query-version", {})
        return {"QMP": {"version": version, "capabilities": []}}

    def feed(self, data: str) -> None:
        """Take client text; answer every complete JSON value in it (QEMU splits the stream
        by bracket nesting the same way, so values need no separator)."""
        self._buffer += data
        while True:
            if self._skipping:  # one answer per stretch of garbage: resume at the next object
                cut = self._buffer.find("{")
                if cut < 0:
                    self._buffer = ""
                    return
                self._buffer, self._skipping = self._buffer[cut:], False
            text = self._buffer.lstrip()
            end = value_end(text)
            if end is None:
                if len(text) > MAX_INPUT:  # drop it: resume at the next object after its start
                    self._buffer, self._skipping = text[1:], True
                    self.send(self._error(GENERIC_ERROR, f"JSON parse error, input exceeds {MAX_INPUT} bytes"))
                    continue
                else:
                    self._buffer = text  # incomplete: wait for more
                return
            self._buffer = text[end:]
            try:
                value = _decoder.decode(text[:end])
            except (ValueError, RecursionError) as exc:
                self.send(self._error(GENERIC_ERROR, f"JSON parse error, {exc}"))
                self._skipping = True
                continue
            self.send(self.handle(value))

    def handle(self, request: object) -> dict[str, object]:
        """One request -> its reply (never raises for anything a client can send)."""
        if not isinstance(request, dict):
            return self._error(GENERIC_ERROR, "QMP input must be a JSON object")
        reply_id = request.get("id", None)
        try:
            result = self._execute(request)
        except CommandError as exc:
            reply: dict[str, object] = self._error(exc.cls, exc.desc)
        except Exception as exc:  # a VMM bug: answer and report it, never drop the client
            report_thread_error("QMP command", exc, [])
            reply = self._error(GENERIC_ERROR, f"internal error: {type(exc).__name__}: {exc}")
        else:
            reply = {"return": result}
        if "id" in request:
            reply["id"] = reply_id
        return reply

    def _execute(self, request: dict[str, object]) -> object:
        if "exec-oob" in request:
            raise CommandError(GENERIC_ERROR, "QMP input member 'exec-oob' is unexpected (out-of-band execution is not enabled)")
        for key in request:
            if key not in REQUEST_MEMBERS:
                raise CommandError(GENERIC_ERROR, f"QMP input member '{key}' is unexpected")
        name = request.get("execute")
        if not isinstance(name, str):
            raise CommandError(GENERIC_ERROR, "QMP input member 'execute' must be a string" if "execute" in request
                               else "QMP input lacks member 'execute'")  # fmt: skip
        args = request.get("arguments", {})
        if name == "qmp_capabilities":
            if self.negotiated:
                raise CommandError(COMMAND_NOT_FOUND, "Capabilities negotiation is already complete, command ignored")
            result = dispatch(self.monitor, name, args)
            enable = args.get("enable", []) if isinstance(args, dict) else []
            if enable:
                raise CommandError(GENERIC_ERROR, f"Capability '{enable[0] if isinstance(enable, list) else enable}' not available")
            self.negotiated = True
            return result
        if not self.negotiated:
            raise CommandError(COMMAND_NOT_FOUND, "Expecting capabilities negotiation with 'qmp_capabilities'")
        return dispatch(self.monitor, name, args)

    @staticmethod
    def _error(cls: str, desc: str) -> dict[str, object]:
        return {"error": {"class": cls, "desc": desc}}


class QmpServer:
    """Accepts one client at a time on a listening socket and runs a `QmpSession` for it,
    on its own thread. Events reach the connected, negotiated client."""

    def __init__(self, sock: socket.socket, monitor: Monitor, path: str) -> None:
        self.sock = sock
        self.path = path
        self.monitor = monitor
        self.errors: list[BaseException] = []
        self._conn: socket.socket | None = None
        self._session: QmpSession | None = None
        self._send_lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="minivmm-qmp", daemon=True)
        monitor.machine.add_event_listener(self.send_event)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, let a reply being written finish, remove the socket path."""
        self._closing = True
        for s in (self.sock, self._conn):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.sock.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass

    def send_event(self, name: str, data: dict[str, object]) -> None:
        session = self._session
        if session is not None and session.negotiated:
            event: dict[str, object] = {"event": name, "timestamp": timestamp()}
            if data:
                event["data"] = data
            self._send(event)

    def _send(self, message: dict[str, object]) -> None:
        conn = self._conn
        if conn is None:
            return
        data = (json.dumps(message) + "\r\n").encode()
        with self._send_lock:
            try:
                conn.sendall(data)
            except OSError:
                pass  # the client went away; the reader notices

    def _serve(self) -> None:
        while not self._closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                self._serve_client(conn)
            except Exception as exc:  # never let a client kill the monitor thread
                report_thread_error("QMP connection", exc, self.errors)
            finally:
                self._session, self._conn = None, None
                conn.close()

    def _serve_client(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        self._conn = conn
        session = QmpSession(self.monitor, self._send)
        self._send(session.greeting())
        self._session = session
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while not self._closing:
            try:
                data = conn.recv(4096)
            except ConnectionError:
                return  # the client left (a reset is as good as an EOF)
            if not data:
                return
            session.feed(decoder.decode(data))

