"""The host console: escape parsing, raw mode that always comes back, pipes and closed stdout."""

from __future__ import annotations

import errno
import select
import os
import signal
import subprocess
import sys
import termios
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from minivmm.devices.console import (
    CTRL_A,
    Console,
    EscapeAction,
    EscapeParser,
    FdWriter,
    RawTerminal,
)
from minivmm.eventloop import EventLoop
from support.idle import wait_blocked_watching, wait_until

REPO = Path(__file__).resolve().parents[1]
A = bytes([CTRL_A])


# --------------------------------------------------------------------- escape parser


@pytest.mark.parametrize(
    ("typed", "events"),
    [
        (b"ls -l\r", [b"ls -l\r"]),
        (b"", []),
        (A + b"x", [EscapeAction.QUIT]),
        (A + b"X", [EscapeAction.QUIT]),
        (b"abc" + A + b"x" + b"after", [b"abc", EscapeAction.QUIT, b"after"]),
        (A + A, [A]),
        (A + A + A + A, [A + A]),
        (b"a" + A + A + b"b", [b"a" + A + b"b"]),
        (A + b"h", [EscapeAction.HELP]),
        (A + b"?", [EscapeAction.HELP]),
        (A + b"s", [EscapeAction.STATS]),
        (A + b"bt", [EscapeAction.BREAK, b"t"]),  # break, then the SysRq key, in order
        (A + b"z", [A + b"z"]),  # unknown: both go through
        (A + b"\r", [A + b"\r"]),
        (b"\x03\x04\x1a", [b"\x03\x04\x1a"]),  # Ctrl-C/D/Z belong to the guest
    ],
)
def test_escape_parser(typed: bytes, events: list[object]) -> None:
    parser = EscapeParser()
    assert parser.feed(typed) == events
    assert not parser.pending_escape


def test_escape_split_across_reads() -> None:
    parser = EscapeParser()
    assert parser.feed(b"echo hi" + A) == [b"echo hi"]
    assert parser.pending_escape
    assert parser.feed(b"") == []
    assert parser.pending_escape
    assert parser.feed(b"x") == [EscapeAction.QUIT]
    assert not parser.pending_escape


def test_literal_escape_split_across_reads() -> None:
    parser = EscapeParser()
    assert parser.feed(A) == []
    assert parser.feed(A + b"q") == [A + b"q"]
    assert parser.feed(A) == []
    assert parser.feed(b"k") == [A + b"k"]


def test_other_escape_character() -> None:
    parser = EscapeParser(escape=0x1D)  # Ctrl-]
    assert parser.feed(b"\x1dx" + A + b"x") == [EscapeAction.QUIT, A + b"x"]


# --------------------------------------------------------------------- raw mode on a pty


@pytest.fixture
def pty() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def assert_raw(fd: int) -> None:
    iflag, oflag, cflag, lflag, _, _, cc = termios.tcgetattr(fd)
    assert not lflag & (termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
    assert not iflag & (termios.ICRNL | termios.IXON)
    assert oflag & termios.OPOST and oflag & termios.ONLCR  # host output stays sane
    assert cflag & termios.CSIZE == termios.CS8
    assert cc[termios.VMIN] == 1 and cc[termios.VTIME] == 0


def test_raw_mode_restored_on_normal_exit(pty: tuple[int, int]) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    with RawTerminal(slave) as term:
        assert term.active
        assert_raw(slave)
        assert termios.tcgetattr(slave) != before
    assert termios.tcgetattr(slave) == before
    assert not term.active


def test_raw_mode_restored_after_exception(pty: tuple[int, int]) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    with pytest.raises(RuntimeError, match="vcpu exploded"):
        with RawTerminal(slave):
            assert_raw(slave)
            raise RuntimeError("vcpu exploded")
    assert termios.tcgetattr(slave) == before


def test_restore_is_idempotent_and_hooks_are_removed(pty: tuple[int, int]) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    term = RawTerminal(slave)
    term.enter()
    term.restore()
    term.restore()
    assert termios.tcgetattr(slave) == before
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_non_tty_is_left_alone() -> None:
    r, w = os.pipe()
    try:
        term = RawTerminal(r)
        assert term.enter() is False
        assert not term.active
        term.restore()
    finally:
        os.close(r)
        os.close(w)


CHILD = textwrap.dedent(
    """
    import os, sys, signal
    sys.path.insert(0, {repo!r})
    from minivmm.devices.console import RawTerminal
    fd = int(sys.argv[1])
    how = sys.argv[2]
    term = RawTerminal(fd)
    term.enter()
    print("raw", flush=True)
    if how == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    elif how == "sighup":
        os.kill(os.getpid(), signal.SIGHUP)
    elif how == "exception":
        raise SystemError("unhandled")
    elif how == "exit":
        sys.exit(3)
    print("not reached", flush=True)
    """
)


@pytest.mark.parametrize(
    ("how", "returncode"),
    [("sigterm", -signal.SIGTERM), ("sighup", -signal.SIGHUP), ("exception", 1), ("exit", 3)],
)
def test_raw_mode_restored_when_the_process_dies(pty: tuple[int, int], how: str, returncode: int) -> None:
    """A process that never restores itself: the signal handler or atexit must."""
    _, slave = pty
    before = termios.tcgetattr(slave)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(repo=str(REPO)), str(slave), how],
        pass_fds=(slave,),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.stdout.startswith("raw")
    assert "not reached" not in proc.stdout
    assert proc.returncode == returncode  # the signal still kills with its own status
    assert termios.tcgetattr(slave) == before


# --------------------------------------------------------------------- console wiring


class FakePort:
    def __init__(self) -> None:
        self.received = bytearray()
        self.breaks = 0
        self.got_data = threading.Event()

    def queue_input(self, data: bytes) -> int:
        self.received.extend(data)
        self.got_data.set()
        return len(data)

    def send_break(self) -> None:
        self.breaks += 1

    def stats(self) -> dict[str, int]:
        return {"tx_bytes": 7, "rx_bytes": 9}


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    ev = EventLoop()
    ev.start()
    yield ev
    ev.stop()
    assert ev.errors == []


def read_available(fd: int, timeout: float = 2.0) -> bytes:
    """Drain a pty master for a little while."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.05)
        if r:
            out.extend(os.read(fd, 4096))
        elif out:
            break
    return bytes(out)


def test_console_on_a_pty(pty: tuple[int, int], loop: EventLoop) -> None:
    master, slave = pty
    before = termios.tcgetattr(slave)
    quits: list[bool] = []
    port = FakePort()
    console = Console(loop, on_quit=lambda: quits.append(True), stdin_fd=slave, stdout_fd=slave)
    console.attach(port)
    with console:
        assert_raw(slave)
        os.write(master, b"root\r\x03")
        wait_until(lambda: bytes(port.received) == b"root\r\x03")  # no ICRNL, no SIGINT
        console.write(b"guest says hi\r\n")
        assert b"guest says hi" in read_available(master)
        os.write(master, A + b"h")
        assert b"Ctrl-A x" in read_available(master)
        os.write(master, A + b"s")
        stats = read_available(master)
        assert b"tx_bytes=7" in stats and b"console_in=6" in stats
        os.write(master, A + b"b")
        wait_until(lambda: port.breaks == 1)
        os.write(master, A)
        wait_until(lambda: console.parser.pending_escape)  # read on its own...
        os.write(master, b"x")  # ...so the escape is split across two reads
        wait_until(lambda: quits == [True])
        assert not console.reading
        assert port.received == b"root\r\x03"
    assert termios.tcgetattr(slave) == before


def test_console_restores_pty_after_exception(pty: tuple[int, int], loop: EventLoop) -> None:
    _, slave = pty
    before = termios.tcgetattr(slave)
    console = Console(loop, on_quit=lambda: None, stdin_fd=slave, stdout_fd=slave)
    console.attach(FakePort())
    with pytest.raises(KeyError):
        with console:
            assert_raw(slave)
            raise KeyError("machine failed")
    assert termios.tcgetattr(slave) == before
    assert not console.reading


def test_console_with_piped_stdin(loop: EventLoop) -> None:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    calls = 0
    port = FakePort()
    console = Console(loop, on_quit=lambda: None, stdin_fd=r, stdout_fd=out_w)
    console.attach(port)
    original = console._on_stdin

    def counting() -> None:
        nonlocal calls
        calls += 1
        original()

    console._on_stdin = counting  # type: ignore[method-assign]
    try:
        with console:
            assert not console.terminal.active  # termios untouched on a pipe
            os.write(w, b"echo from a pipe\n")
            wait_until(lambda: port.received == b"echo from a pipe\n")
            os.close(w)
            w = -1
            wait_until(lambda: console.stdin_eof)
            assert not console.reading
            # EOF removed the reader, so no busy loop: the loop thread sleeps in epoll_wait
            # on its wake-up pipe alone, not on the (always readable) pipe at EOF
            wait_blocked_watching(loop._thread, {loop._wake_r})  # type: ignore[arg-type]
            assert calls <= 3
            console.write(b"still streaming\n")
            assert os.read(out_r, 100) == b"still streaming\n"
    finally:
        for fd in (r, out_r, out_w, w):
            if fd >= 0:
                os.close(fd)


def test_console_with_dev_null_stdin(loop: EventLoop) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    out_r, out_w = os.pipe()
    try:
        with Console(loop, on_quit=lambda: None, stdin_fd=null, stdout_fd=out_w) as console:
            assert console.stdin_eof and not console.reading
            console.write(b"boot log\n")
            assert os.read(out_r, 100) == b"boot log\n"
        # The loop thread is alive and idle.
        done = threading.Event()
        loop.call_soon(done.set)
        assert done.wait(2)
    finally:
        for fd in (null, out_r, out_w):
            os.close(fd)


def test_console_with_closed_stdin(loop: EventLoop) -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        with Console(loop, on_quit=lambda: None, stdin_fd=r, stdout_fd=w) as console:
            assert not console.reading and console.stdin_eof
    finally:
        os.close(w)


# --------------------------------------------------------------------- output writer


def test_writer_survives_closed_pipe() -> None:
    r, w = os.pipe()
    os.close(r)
    writer = FdWriter(w)
    try:
        writer.write(b"nobody listens")  # EPIPE (SIGPIPE is ignored by Python)
        writer.write(b"still nobody")
        assert writer.error == errno.EPIPE
        assert writer.bytes_dropped == len(b"nobody listens") + len(b"still nobody")
    finally:
        os.close(w)


def test_writer_handles_partial_writes_and_eagain() -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)  # somebody else made our stdout non-blocking
    data = bytes(i % 256 for i in range(1 << 20))
    got = bytearray()

    def reader() -> None:
        while len(got) < len(data):
            time.sleep(0.001)  # a slow terminal
            got.extend(os.read(r, 65536))

    t = threading.Thread(target=reader)
    t.start()
    writer = FdWriter(w)
    try:
        writer.write(data)
        t.join(timeout=30)
        assert bytes(got) == data
        assert writer.error is None and writer.bytes_written == len(data)
    finally:
        os.close(r)
        os.close(w)


def test_writer_close_unsticks_a_blocked_writer() -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    writer = FdWriter(w)
    t = threading.Thread(target=writer.write, args=(b"x" * (1 << 20),))
    try:
        t.start()
        # the pipe is full and nobody reads: the writer cannot finish (an explicit state)
        wait_until(lambda: writer.bytes_written > 0 and not select.select([], [w], [], 0)[1])
        assert writer.bytes_written < 1 << 20 and t.is_alive()
        writer.close()
        t.join(timeout=5)
        assert not t.is_alive()
    finally:
        os.close(r)
        os.close(w)


def test_console_stdout_closed_keeps_quiet(loop: EventLoop) -> None:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    os.close(out_r)
    try:
        with Console(loop, on_quit=lambda: None, stdin_fd=r, stdout_fd=out_w) as console:
            for _ in range(3):
                console.write(b"guest output\r\n")
            assert console.writer.error == errno.EPIPE
    finally:
        for fd in (r, w, out_w):
            os.close(fd)


def test_console_and_uart_end_to_end(loop: EventLoop) -> None:
    """Keys through a pipe reach the guest's RBR; THR writes reach stdout."""
    from minivmm.devices.serial import UART_IER, UART_IER_RDI, UART_LSR, UART_LSR_DR, UART_RX, UART_TX, Serial16550

    class Line:
        def __init__(self) -> None:
            self.level = False

        def set_level(self, level: bool) -> None:
            self.level = level

    r, w = os.pipe()
    out_r, out_w = os.pipe()
    irq = Line()
    try:
        console = Console(loop, on_quit=lambda: None, stdin_fd=r, stdout_fd=out_w)
        uart = Serial16550(irq, output=console.write)
        console.attach(uart)
        with console:
            uart.write(UART_IER, 1, UART_IER_RDI)
            os.write(w, b"uname -a\r" + A + A)
            wait_until(lambda: irq.level and uart.pending_input() == 10)
            got = bytearray()
            while uart.read(UART_LSR, 1) & UART_LSR_DR:
                got.append(uart.read(UART_RX, 1))
            assert got == b"uname -a\r" + A
            assert not irq.level
            for ch in b"Linux\r\n":
                uart.write(UART_TX, 1, ch)
            assert os.read(out_r, 100) == b"Linux\r\n"
    finally:
        for fd in (r, w, out_r, out_w):
            os.close(fd)


def test_ctrl_a_c_switches_between_the_guest_and_the_monitor(loop: EventLoop) -> None:
    """In monitor mode typed lines go to the monitor (echoed, editable), not to the guest;
    Ctrl-A c again returns to the guest."""
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    lines: list[str] = []

    def monitor(line: str) -> str:
        lines.append(line)
        return f"ran {line}\n"

    port = FakePort()
    console = Console(loop, on_quit=lambda: None, stdin_fd=r, stdout_fd=out_w, monitor=monitor)
    console.attach(port)
    try:
        with console:
            os.write(w, b"ab\x01c")
            wait_until(lambda: console.monitor_mode)
            os.write(w, b"info statux\x7fs\r")
            wait_until(lambda: lines == ["info status"])
            os.write(w, b"\x01cdef")
            wait_until(lambda: port.received == b"abdef")
            shown = read_available(out_r)
            assert b"(minivmm) info statux\b \bs\r\nran info status\r\n(minivmm) " in shown
            assert not console.monitor_mode
    finally:
        for fd in (r, w, out_r, out_w):
            os.close(fd)
