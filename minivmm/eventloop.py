"""The VMM's event loop: one thread waiting on file descriptors (eventfds, stdin) with selectors."""

from __future__ import annotations

import os
import selectors
import threading
from typing import Callable

from .errors import report_thread_error


class EventLoop:
    """Run callbacks when file descriptors become readable, on a single background thread.

    Callbacks run on the loop thread, never on a vCPU thread, so a slow one (an fsync) never
    stalls the guest's CPU. `add_reader`/`remove_reader` may be called from any thread.
    """

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []
        self._stop = False
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.call_soon(lambda: self._sel.register(fd, selectors.EVENT_READ, callback))

    def remove_reader(self, fd: int) -> None:
        def remove() -> None:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass

        self.call_soon(remove)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread (immediately if the loop is not running yet)."""
        if self._thread is None or threading.current_thread() is self._thread:
            fn()
            return
        with self._lock:
            self._pending.append(fn)
        os.write(self._wake_w, b"x")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="minivmm-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(timeout=5)

    def close(self) -> None:
        """Stop the loop thread if it runs, and release the selector and the wake-up pipe."""
        self.stop()
        self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select():
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    with self._lock:
                        pending, self._pending = self._pending, []
                    for fn in pending:
                        fn()
                    continue
                try:
                    key.data()
                except Exception as exc:  # a device bug must not kill every other device
                    report_thread_error("event loop callback", exc, self.errors)
