"""The contract between a virtio transport and a virtio device (virtio spec 1.2, section 2).

The transport (virtio-pci) owns feature negotiation, device status, queue registers and
interrupts; the device owns its configuration space and what it does with its queues.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from ...memory import GuestMemory
from .queue import Virtqueue

VIRTIO_F_VERSION_1 = 1 << 32


class VirtioDevice(Protocol):
    device_id: int  # virtio spec 5: e.g. 27 for pmem
    device_features: int  # device-specific feature bits; the transport adds VIRTIO_F_VERSION_1
    queue_max_sizes: Sequence[int]  # one entry per virtqueue

    def read_config(self, offset: int, size: int) -> int:
        """Read the device-specific configuration structure (out-of-range reads return 0)."""
        ...

    def write_config(self, offset: int, size: int, value: int) -> None: ...

    def activate(
        self,
        mem: GuestMemory,
        queues: Sequence[Virtqueue],
        notify_fds: Sequence[int],
        signal_used: Callable[[int], None],
        needs_reset: Callable[[], None],
    ) -> None:
        """DRIVER_OK was set: start serving. `notify_fds[i]` is an eventfd the guest's notify
        write to queue i signals (a KVM ioeventfd); `signal_used(i)` interrupts the guest for
        queue i; `needs_reset()` puts the device in DEVICE_NEEDS_RESET after a bad request."""
        ...

    def begin_reset(self) -> None:
        """The driver wrote 0 to device status (2.4): stop serving and forget the queues, without
        waiting (this runs on a vCPU thread; a host operation in progress may finish first)."""
        ...

    def reset_done(self) -> bool:
        """Whether the reset `begin_reset` started has finished: from then on the device makes no
        completion, interrupt or guest-memory write until it is activated again."""
        ...

    def reset(self) -> None:
        """`begin_reset` and wait until it is done (VMM shutdown; tests)."""
        ...
