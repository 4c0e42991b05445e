"""In-process stand-ins for the machine's KVM-backed interrupt plumbing, for tests.

`FakeMsiRoute` models an irqfd route: a signal on an unmasked route is delivered at once
(appended to `delivered` as (address, data)); on a masked route it accumulates in a counter
(`pending()`), and unmasking delivers it once - like KVM re-attaching an irqfd whose eventfd
already has a count. `FakeIoEventRegistry` records ioeventfd calls and refuses duplicates as
KVM does (EEXIST).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field


class FakeMsiRoute:
    def __init__(self, index: int) -> None:
        self.index = index
        self.address = 0
        self.data = 0
        self.masked = False
        self.count = 0  # signals accumulated while masked
        self.delivered: list[tuple[int, int]] = []
        self.calls: list[tuple] = []
        self.closed = False
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @property
    def eventfd(self) -> int:
        return self._fd

    def set_message(self, address: int, data: int) -> None:
        self.calls.append(("set_message", address, data))
        self.address, self.data = address, data

    def set_masked(self, masked: bool) -> None:
        self.calls.append(("set_masked", masked))
        self.masked = masked
        if not masked:
            self._drain()

    def _drain(self) -> None:
        try:
            self.count += os.eventfd_read(self._fd)
        except BlockingIOError:
            pass
        if not self.masked and self.count:
            self.delivered.append((self.address, self.data))
            self.count = 0

    def poll(self) -> None:
        """What KVM does when the eventfd is written: deliver unless masked."""
        self._drain()

    def pending(self) -> bool:
        self._drain()
        return self.count > 0

    def clear_pending(self) -> None:
        self._drain()
        self.count = 0

    def trigger(self) -> None:
        os.eventfd_write(self._fd, 1)
        self._drain()

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            self.closed = True


class FakeInterruptController:
    def __init__(self) -> None:
        self.routes: list[FakeMsiRoute] = []

    def irq_line(self, pin: int):  # pragma: no cover - no INTx on PCI here
        raise NotImplementedError("no INTx")

    def msi_route(self) -> FakeMsiRoute:
        route = FakeMsiRoute(len(self.routes))
        self.routes.append(route)
        return route


@dataclass
class FakeIoEventRegistry:
    active: set[tuple[int, int, int, int | None]] = field(default_factory=set)
    calls: list[tuple] = field(default_factory=list)

    def add_ioeventfd(
        self, addr: int, length: int, fd: int, *, pio: bool = False, datamatch: int | None = None
    ) -> None:
        key = (addr, length, fd, datamatch)
        self.calls.append(("add", *key))
        if key in self.active:
            raise OSError(errno.EEXIST, "ioeventfd already registered")
        self.active.add(key)

    def remove_ioeventfd(
        self, addr: int, length: int, fd: int, *, pio: bool = False, datamatch: int | None = None
    ) -> None:
        key = (addr, length, fd, datamatch)
        self.calls.append(("remove", *key))
        if key not in self.active:
            raise OSError(errno.ENOENT, "no such ioeventfd")
        self.active.discard(key)
