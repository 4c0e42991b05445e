"""Explicit idle states of a thread, read from /proc: what a test waits for instead of
sleeping and concluding that nothing happened.

A thread of this process blocked in `epoll_wait` (`selectors.DefaultSelector` on Linux) shows
the syscall and its epoll descriptor in /proc/self/task/TID/syscall (proc(5)); the
descriptors that epoll instance watches are the `tfd:` lines of /proc/self/fdinfo/EPFD
(proc_fdinfo(5)). A thread blocked on an epoll that does not watch a descriptor cannot react
to it until something it does watch wakes it.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

# x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl)
EPOLL_WAITS = {232: "epoll_wait", 281: "epoll_pwait", 441: "epoll_pwait2"}
_TFD = re.compile(r"^tfd:\s*(\d+)", re.MULTILINE)


def epoll_watched(thread: threading.Thread) -> set[int] | None:
    """The descriptors watched by the epoll instance `thread` is blocked on right now, or
    None when it is not blocked in an epoll wait (running, or in another syscall)."""
    fields = Path(f"/proc/self/task/{thread.native_id}/syscall").read_text().split()
    if not fields or not fields[0].isdigit() or int(fields[0]) not in EPOLL_WAITS:
        return None
    epfd = int(fields[1], 16)
    try:
        return {int(fd) for fd in _TFD.findall(Path(f"/proc/self/fdinfo/{epfd}").read_text())}
    except FileNotFoundError:  # closed under us: it was not the wait we are looking for
        return None


def wait_until(cond: Callable[[], bool], what: str = "the condition", timeout: float = 10.0) -> None:
    """Poll `cond` until it holds; fail saying `what` was awaited."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def wait_blocked_watching(thread: threading.Thread, fds: set[int], timeout: float = 10.0) -> None:
    """Wait until `thread` is blocked in epoll_wait watching exactly `fds`."""
    wait_until(lambda: epoll_watched(thread) == fds, f"{thread.name} blocked in epoll_wait on {sorted(fds)}", timeout)
