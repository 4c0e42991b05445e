"""The host side of the serial console: stdin to the guest's UART, the UART to stdout.

Pieces, each usable alone:

* :class:`EscapeParser` — a pure state machine splitting keystrokes into bytes for the guest
  and console commands (``Ctrl-A x`` quits, ``Ctrl-A h`` helps, ...).
* :class:`RawTerminal` — puts a TTY in raw mode and guarantees the original mode comes back:
  on ``__exit__`` (also after an exception), at interpreter exit (atexit), and when a
  terminating signal with the default action (SIGTERM, SIGHUP, SIGQUIT) arrives.
* :class:`FdWriter` — writes everything to a file descriptor, riding out partial writes and
  EAGAIN, and silently dropping output once the reader is gone (EPIPE): a closed pipe on
  stdout must not stop the guest.
* :class:`Console` — wires the three to an :class:`~minivmm.eventloop.EventLoop` and a
  serial port.

Stdin is read only when the event loop reports it readable, and O_NONBLOCK is deliberately
not set: on a terminal, stdin, stdout and stderr usually share one open file description,
so the flag would also make the VMM's (and, after exit, the shell's) writes fail with
EAGAIN.
"""

from __future__ import annotations

import atexit
import enum
import errno
import os
import select
import signal
import stat
import termios
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

if TYPE_CHECKING:
    from ..timeline import MilestoneScanner

CTRL_A = 0x01
READ_CHUNK = 4096

# ----------------------------------------------------------------------------- escapes


class EscapeAction(enum.Enum):
    """A console command typed after the escape character."""

    QUIT = "quit"
    HELP = "help"
    STATS = "stats"
    BREAK = "break"
    MONITOR = "monitor"
    POWER_CUT = "power-cut"


# Key after the escape character -> command. The escape character itself (twice) sends
# one literal escape; any other key sends both the escape and the key, so nothing typed is
# lost (an editor's or a shell's Ctrl-A still works, just followed by the next key).
ESCAPE_COMMANDS: dict[int, EscapeAction] = {
    ord("x"): EscapeAction.QUIT,
    ord("X"): EscapeAction.QUIT,
    ord("h"): EscapeAction.HELP,
    ord("H"): EscapeAction.HELP,
    ord("?"): EscapeAction.HELP,
    ord("s"): EscapeAction.STATS,
    ord("S"): EscapeAction.STATS,
    ord("b"): EscapeAction.BREAK,
    ord("B"): EscapeAction.BREAK,
    ord("c"): EscapeAction.MONITOR,
    ord("C"): EscapeAction.MONITOR,
    ord("p"): EscapeAction.POWER_CUT,
    ord("P"): EscapeAction.POWER_CUT,
}

HELP_TEXT = (
    "\r\n"
    "minivmm console escapes:\r\n"
    "  Ctrl-A x       quit (stops the virtual machine)\r\n"
    "  Ctrl-A h       this help\r\n"
    "  Ctrl-A s       serial statistics\r\n"
    "  Ctrl-A b       send a BREAK (then, within 5 s, a magic SysRq key)\r\n"
    "  Ctrl-A c       switch between the guest and the (minivmm) monitor\r\n"
    "  Ctrl-A p       cut the power: stop at once, unflushed pmem writes are lost\r\n"
    "  Ctrl-A Ctrl-A  send Ctrl-A to the guest\r\n"
)

Event = bytes | EscapeAction
MONITOR_PROMPT = b"(minivmm) "
MONITOR_BANNER = b"\r\nminivmm monitor - type 'help' for a list of commands, Ctrl-A c to return to the guest\r\n" + MONITOR_PROMPT
MONITOR_LINE_MAX = 4096


class EscapeParser:
    """Bytes typed by the user in, ordered events out.

    :meth:`feed` returns a list of events in input order: ``bytes`` runs for the guest and
    :class:`EscapeAction` commands (order matters: ``Ctrl-A b`` then ``t`` must reach the
    guest as a break followed by ``t``). An escape character at the end of one read waits for
    the next read, so a command split across reads works.
    """

    def __init__(self, escape: int = CTRL_A) -> None:
        self.escape = escape
        self._pending_escape = False

    @property
    def pending_escape(self) -> bool:
        """An escape character was read and the next key decides what it means."""
        return self._pending_escape

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        run = bytearray()

        def flush() -> None:
            if run:
                events.append(bytes(run))
                run.clear()

        for ch in data:
            if not self._pending_escape:
                if ch == self.escape:
                    self._pending_escape = True
                else:
                    run.append(ch)
                continue
            self._pending_escape = False
            action = ESCAPE_COMMANDS.get(ch)
            if action is not None:
                flush()
                events.append(action)
            elif ch == self.escape:
                run.append(ch)
            else:
                run.extend((self.escape, ch))
        flush()
        return events


# ----------------------------------------------------------------------------- raw mode

# termios attribute list indices (termios.tcgetattr)
IFLAG, OFLAG, CFLAG, LFLAG, ISPEED, OSPEED, CC = range(7)

# Raw input: every byte as typed, no signals from Ctrl-C/Ctrl-Z (they belong to the guest),
# no echo (the guest echoes), no CR/NL translation, no XON/XOFF. Output post-processing
# (OPOST/ONLCR) is kept: the guest already sends CR LF, and the VMM's own log lines on stderr,
# which shares the terminal, still start at column 0.
RAW_CLEAR_IFLAG = (
    termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
    | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
)
RAW_CLEAR_LFLAG = termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN
RAW_SET_OFLAG = termios.OPOST | termios.ONLCR

# Terminating signals whose default action would kill the process without running Python
# cleanup. SIGINT is absent: Python's handler raises KeyboardInterrupt, which unwinds
# through the context managers.
RESTORE_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def raw_attributes(attrs: list[Any]) -> list[Any]:
    """The raw-mode version of a ``termios.tcgetattr`` list (a new list)."""
    raw = [*attrs[:CC], list(attrs[CC])]
    raw[IFLAG] &= ~RAW_CLEAR_IFLAG
    raw[OFLAG] |= RAW_SET_OFLAG
    raw[CFLAG] = (raw[CFLAG] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    raw[LFLAG] &= ~RAW_CLEAR_LFLAG
    raw[CC][termios.VMIN] = 1  # a read returns as soon as one byte is there
    raw[CC][termios.VTIME] = 0
    return raw


class RawTerminal:
    """Raw mode on a TTY for the duration of a ``with`` block (a no-op on a non-TTY).

    The original attributes come back exactly once, whichever comes first: ``__exit__``
    (normal or exceptional), :meth:`restore`, interpreter exit, or a SIGTERM/SIGHUP/SIGQUIT
    whose handler was the default (the signal is then re-raised with its default action so
    the exit status stays honest). :meth:`restore` takes no lock and swaps the saved state out
    in one step, so it is safe to run from a Python signal handler that interrupted it.
    """

    def __init__(self, fd: int, *, install_signal_handlers: bool = True) -> None:
        self.fd = fd
        self._install_signals = install_signal_handlers
        self._saved: list[Any] | None = None
        self._prev_handlers: dict[int, Any] = {}

    @property
    def active(self) -> bool:
        """Raw mode is on (set by us and not yet restored)."""
        return self._saved is not None

    def enter(self) -> bool:
        """Switch to raw mode; returns False (and changes nothing) when fd is not a TTY."""
        if self._saved is not None:
            return True
        if not os.isatty(self.fd):
            return False
        saved = termios.tcgetattr(self.fd)
        # Register the safety nets before changing anything: a signal between the two
        # must already find the way back.
        self._saved = saved
        atexit.register(self.restore)
        self._hook_signals()
        termios.tcsetattr(self.fd, termios.TCSADRAIN, raw_attributes(saved))
        return True

    def restore(self) -> None:
        """Put the original attributes back (idempotent; errors from a vanished terminal
        are ignored: there is nothing left to restore)."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        try:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
        except (termios.error, OSError):
            pass
        self._unhook_signals()
        atexit.unregister(self.restore)

    def __enter__(self) -> RawTerminal:
        self.enter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _hook_signals(self) -> None:
        if not self._install_signals or threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works on the main thread; atexit still covers us
        for sig in RESTORE_SIGNALS:
            # Only where the default action would kill us: a Python handler already leads
            # to cleanup, and an ignored signal must stay ignored.
            if signal.getsignal(sig) is signal.SIG_DFL:
                self._prev_handlers[sig] = signal.SIG_DFL
                signal.signal(sig, self._on_signal)

    def _unhook_signals(self) -> None:
        handlers, self._prev_handlers = self._prev_handlers, {}
        if threading.current_thread() is not threading.main_thread():
            # Cannot touch handlers here; _on_signal copes with having nothing to restore.
            return
        for sig, prev in handlers.items():
            if signal.getsignal(sig) == self._on_signal:  # leave a later owner's handler alone
                signal.signal(sig, prev)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.restore()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


# ----------------------------------------------------------------------------- output


class FdWriter:
    """Write-through output to a file descriptor, callable from any thread.

    Every call writes all of ``data`` before returning (looping over partial writes and
    waiting for POLLOUT on EAGAIN, in case somebody made the descriptor non-blocking). When
    the reader is gone (EPIPE, EIO on a hung-up terminal, a closed descriptor) output is
    dropped from then on, silently: the guest keeps running. ``error`` tells why.
    """

    POLL_MS = 100  # re-check `closed` this often while the reader does not drain

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()  # one caller's bytes never interleave with another's
        self.closed = False  # set by close() to let a writer stuck on EAGAIN give up
        self.error: int | None = None  # errno that made us drop output
        self.bytes_written = 0
        self.bytes_dropped = 0

    def write(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            while view:
                if self.error is not None or self.closed:
                    self.bytes_dropped += len(view)
                    return
                try:
                    n = os.write(self.fd, view)
                except BlockingIOError:
                    self._wait_writable()
                    continue
                except OSError as exc:  # EPIPE, EIO, EBADF...: the reader is gone for good
                    self.error = exc.errno or errno.EIO
                    continue
                self.bytes_written += n
                view = view[n:]

    def _wait_writable(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        poller.poll(self.POLL_MS)  # an error or hangup also wakes us; write() then says which

    def close(self) -> None:
        """Stop writing (pending and later writes are dropped); the fd itself stays open."""
        self.closed = True


# ----------------------------------------------------------------------------- console


class GuestPort(Protocol):
    """What the console needs from the serial device (Serial16550 provides it)."""

    def queue_input(self, data: bytes) -> int: ...

    def send_break(self) -> None: ...

    def stats(self) -> Mapping[str, int]: ...


class LoopLike(Protocol):
    """The part of :class:`~minivmm.eventloop.EventLoop` the console uses."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove_reader(self, fd: int) -> None: ...

    def call_soon(self, fn: Callable[[], None]) -> None: ...


def _pollable(fd: int) -> bool:
    """Whether epoll (the event loop's selector) accepts fd: pipes, sockets and TTYs do;
    regular files and /dev/null do not (EPERM), and a closed fd does not either."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return False
    ep = select.epoll()
    try:
        ep.register(fd, select.EPOLLIN)
    except OSError:
        return False
    finally:
        ep.close()
    return True


class Console:
    """Connects host stdin/stdout to a guest serial port.

    ``write`` is the serial device's ``output`` (vCPU thread); stdin is read on the event
    loop thread, which also runs the escape commands and calls ``on_quit()``. Use::

        console = Console(loop, on_quit=machine.stop)
        serial = Serial16550(irq4, output=console.write)
        console.attach(serial)
        with console:          # raw mode on a TTY, stdin reader registered
            machine.run()      # restored on the way out, whatever happens

    Stdin that is not a TTY is never put in raw mode; a pipe's data is still forwarded, and
    its EOF removes the reader. Stdin that epoll cannot watch (a regular file, /dev/null, a
    closed fd) is not read at all.
    """

    def __init__(
        self,
        loop: LoopLike,
        *,
        on_quit: Callable[[], None],
        stdin_fd: int = 0,
        stdout_fd: int = 1,
        escape: int = CTRL_A,
        raw: bool = True,
        install_signal_handlers: bool = True,
        monitor: Callable[[str], str] | None = None,
        on_power_cut: Callable[[], object] | None = None,
    ) -> None:
        self._loop = loop
        self._on_power_cut = on_power_cut  # Ctrl-A p; without it the key does nothing
        self._monitor = monitor  # runs one human-monitor line, returns its output
        self.monitor_mode = False
        self._line = bytearray()
        self._on_quit = on_quit
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self._want_raw = raw
        self.parser = EscapeParser(escape)
        self.terminal = RawTerminal(stdin_fd, install_signal_handlers=install_signal_handlers)
        self.writer = FdWriter(stdout_fd)
        self._port: GuestPort | None = None
        self._reading = False
        self._started = False
        self.stdin_eof = False
        self.quit_requested = False
        self.bytes_in = 0  # keystrokes forwarded to the guest
        self.milestones: MilestoneScanner | None = None  # set for --timeline: scans guest output

    def attach(self, port: GuestPort) -> None:
        """Connect the serial device that receives stdin."""
        self._port = port

    def write(self, data: bytes) -> None:
        """Guest output to stdout (any thread; never raises on a closed stdout)."""
        if self.milestones is not None:
            self.milestones.feed(data)
        self.writer.write(data)

    @property
    def reading(self) -> bool:
        """The stdin reader is registered with the event loop."""
        return self._reading

    def start(self) -> None:
        """Raw mode (TTY stdin only) and start forwarding stdin."""
        if self._started:
            return
        self._started = True
        if self._want_raw:
            self.terminal.enter()
        if _pollable(self.stdin_fd):
            self._reading = True
            self._loop.add_reader(self.stdin_fd, self._on_stdin)
        else:
            self.stdin_eof = True

    def stop(self) -> None:
        """Stop reading stdin and restore the terminal (idempotent). When it returns the
        event loop no longer watches stdin. Call it before stopping the loop: with the
        loop already stopped it waits SYNC_TIMEOUT for an answer that cannot come."""
        self._stop_reading(wait=True)
        self.terminal.restore()
        self._started = False

    def __enter__(self) -> Console:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    SYNC_TIMEOUT = 1.0  # seconds to wait for the loop to drop stdin (stop the console first)

    def _stop_reading(self, *, wait: bool = False) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.stdin_fd)
            if wait:
                # Registration and removal are queued to the loop thread; wait until both
                # ran, so that the caller may close stdin right after stop() returns (the
                # loop registering a closed fd would fail on its thread).
                done = threading.Event()
                self._loop.call_soon(done.set)
                done.wait(self.SYNC_TIMEOUT)

    def _on_stdin(self) -> None:
        """Event loop callback: stdin is readable."""
        if not self._reading:
            return  # a removal is queued on the loop but this readiness came first
        try:
            data = os.read(self.stdin_fd, READ_CHUNK)
        except BlockingIOError:
            return  # somebody else took the bytes
        except OSError:
            data = b""  # EIO: the terminal hung up; treat like EOF
        if not data:
            self.stdin_eof = True
            self._stop_reading()  # else a readable-at-EOF fd would spin the loop
            return
        for event in self.parser.feed(data):
            if isinstance(event, bytes):
                if self.monitor_mode:
                    self._monitor_input(event)
                    continue
                self.bytes_in += len(event)
                if self._port is not None:
                    self._port.queue_input(event)
            elif self._run_action(event):
                return

    def _run_action(self, action: EscapeAction) -> bool:
        """Carry out a console command; True when the console stops reading."""
        if action is EscapeAction.QUIT:
            self.quit_requested = True
            self._stop_reading()
            self._on_quit()
            return True
        if action is EscapeAction.POWER_CUT and self._on_power_cut is not None:
            self._stop_reading()
            self._on_power_cut()
            return True
        if action is EscapeAction.HELP:
            self.write(HELP_TEXT.encode())
        elif action is EscapeAction.STATS:
            self.write(self._stats_line().encode())
        elif action is EscapeAction.BREAK:
            if self._port is not None:
                self._port.send_break()
        elif action is EscapeAction.MONITOR and self._monitor is not None:
            self.monitor_mode = not self.monitor_mode
            self._line.clear()
            self.write(MONITOR_BANNER if self.monitor_mode else b"\r\n")
        return False

    def _monitor_input(self, data: bytes) -> None:
        """A tiny line editor for the human monitor: echo, backspace, Ctrl-U, Enter runs."""
        assert self._monitor is not None
        for ch in data:
            if ch in (0x0D, 0x0A):
                line, self._line = self._line.decode(errors="replace"), bytearray()
                output = self._monitor(line) if line.strip() else ""
                self.write(b"\r\n" + output.replace("\n", "\r\n").encode() + MONITOR_PROMPT)
            elif ch in (0x08, 0x7F):
                if self._line:
                    self._line.pop()
                    self.write(b"\b \b")
            elif ch in (0x03, 0x15):  # Ctrl-C, Ctrl-U: drop the line
                self._line.clear()
                self.write(b"\r\n" + MONITOR_PROMPT)
            elif 0x20 <= ch < 0x7F and len(self._line) < MONITOR_LINE_MAX:
                self._line.append(ch)
                self.write(bytes([ch]))

    def _stats_line(self) -> str:
        stats = dict(self._port.stats()) if self._port is not None else {}
        stats["console_in"] = self.bytes_in
        stats["console_out"] = self.writer.bytes_written
        fields = " ".join(f"{k}={v}" for k, v in stats.items())
        return f"\r\n[minivmm serial: {fields}]\r\n"
