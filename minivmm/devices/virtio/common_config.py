"""The virtio-pci common configuration structure and the device status machine.

`VirtioPciCommonConfig` is `struct virtio_pci_common_cfg` (virtio 1.2 §4.1.4.3) as a
`RegisterBlock`, with the state behind it: feature negotiation, the per-queue registers
behind queue_select, the MSI-X vector numbers, config_generation and device_status (§2.1).
It knows nothing of BARs, eventfds or interrupts: the PCI transport (`pci.py`) places it in
BAR 0, serialises the accesses, and is called back at the two transitions that need it.

Device status (§2.1, §3.1.1): the driver only adds bits; writing 0 resets. FEATURES_OK sticks
only when the driver's features are a subset of the offered ones (VIRTIO_F_VERSION_1 plus the
device's) and include VIRTIO_F_VERSION_1. DRIVER_OK sticks only after FEATURES_OK, and then
`on_driver_ok()` activates the device. DEVICE_NEEDS_RESET (`needs_reset`) is the device's:
the driver cannot write it.

Reset (§2.4, §4.1.4.3.1: writing 0 to device_status) calls `on_reset()`, which starts tearing
the running device down and returns at once (the write comes from a vCPU thread, which must
not wait for a device thread). Until `reset_done()` says the device has stopped, device_status
keeps reading its old, non-zero value and status writes are ignored (§2.4: the driver waits
for a read of 0); each status read checks again. Then `reset()` puts every register back to
its reset value (queue_size = the maximum, queue_msix_vector = NO_VECTOR, ...) and status
reads 0. config_generation is not reset: a driver compares it across reads and must see every
change.

Queue registers are frozen while DRIVER_OK is set; their values are only checked when the
driver sets DRIVER_OK (`virtqueues()`), so a bad queue fails the activation, not the write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ...memory import GuestMemory
from ...register_block import Register, RegisterBlock
from .device import VIRTIO_F_VERSION_1, VirtioDevice
from .queue import VIRTIO_F_INDIRECT_DESC, Virtqueue, VirtqueueError

log = logging.getLogger(__name__)

# include/uapi/linux/virtio_pci.h
VIRTIO_MSI_NO_VECTOR = 0xFFFF

# include/uapi/linux/virtio_config.h (§2.1 Device Status Field)
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

FEATURE_WORDS = 2  # device_feature/driver_feature select 32-bit words 0 and 1 of 64 bits


@dataclass
class VirtqueueRegisters:
    """The per-queue registers behind queue_select, with their reset values (§4.1.4.3.1)."""

    max_size: int
    size: int = 0
    msix_vector: int = VIRTIO_MSI_NO_VECTOR
    enable: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0

    def __post_init__(self) -> None:
        self.size = self.max_size


class VirtioPciCommonConfig:
    """struct virtio_pci_common_cfg and device_status for one `VirtioDevice`.

    `msix_vectors` is how many MSI-X vectors the function has: a vector number the driver
    writes at or above it reads back as VIRTIO_MSI_NO_VECTOR (§4.1.4.3.2). Not thread-safe:
    the transport holds its register lock around every access and callback.
    """

    def __init__(
        self,
        device: VirtioDevice,
        msix_vectors: int,
        *,
        on_driver_ok: Callable[[], None],
        on_reset: Callable[[], None],
        reset_done: Callable[[], bool] = lambda: True,
        name: str,
    ) -> None:
        self.device = device
        self.num_queues = len(device.queue_max_sizes)
        self.name = name
        self._msix_vectors = msix_vectors
        self._on_driver_ok = on_driver_ok
        self._on_reset = on_reset
        self._reset_done = reset_done
        self.resetting = False  # a reset was started and the device has not stopped yet
        self.config_generation = 0
        self.registers = RegisterBlock(
            (
                Register(0x00, 4, "device_feature_select", self._get_device_feature_select, self._set_device_feature_select),
                Register(0x04, 4, "device_feature", self._get_device_feature),
                Register(0x08, 4, "driver_feature_select", self._get_driver_feature_select, self._set_driver_feature_select),
                Register(0x0C, 4, "driver_feature", self._get_driver_feature, self._set_driver_feature),
                Register(0x10, 2, "config_msix_vector", self._get_config_msix_vector, self._set_config_msix_vector),
                Register(0x12, 2, "num_queues", self._get_num_queues),
                Register(0x14, 1, "device_status", self._get_device_status, self._set_device_status),
                Register(0x15, 1, "config_generation", self._get_config_generation),
                Register(0x16, 2, "queue_select", self._get_queue_select, self._set_queue_select),
                Register(0x18, 2, "queue_size", self._get_queue_size, self._set_queue_size),
                Register(0x1A, 2, "queue_msix_vector", self._get_queue_msix_vector, self._set_queue_msix_vector),
                Register(0x1C, 2, "queue_enable", self._get_queue_enable, self._set_queue_enable),
                Register(0x1E, 2, "queue_notify_off", self._get_queue_notify_off),
                Register(0x20, 8, "queue_desc", self._get_queue_desc, self._set_queue_desc),
                Register(0x28, 8, "queue_driver", self._get_queue_driver, self._set_queue_driver),
                Register(0x30, 8, "queue_device", self._get_queue_device, self._set_queue_device),
                # The two virtio 1.2 fields read 0: VIRTIO_F_NOTIF_CONFIG_DATA and
                # VIRTIO_F_RING_RESET are not offered.
                Register(0x38, 2, "queue_notify_data", _zero),
                Register(0x3A, 2, "queue_reset", _zero),
            )
        )
        self.reset()

    # -- state ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Every register back to its reset value (§4.1.4.3.1); config_generation stays."""
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self._status = 0
        self.queue_select = 0
        self.queue_registers = [VirtqueueRegisters(m) for m in self.device.queue_max_sizes]
        self.needs_reset = False  # DEVICE_NEEDS_RESET; set from any thread
        self.resetting = False

    @property
    def offered_features(self) -> int:
        return (self.device.device_features | VIRTIO_F_VERSION_1) & ((1 << 64) - 1)

    @property
    def status(self) -> int:
        """device_status as the driver reads it."""
        return self._status | (VIRTIO_CONFIG_S_NEEDS_RESET if self.needs_reset else 0)

    @property
    def driver_ok(self) -> bool:
        return bool(self._status & VIRTIO_CONFIG_S_DRIVER_OK)

    def virtqueues(self, mem: GuestMemory) -> list[Virtqueue]:
        """The queues as the driver set them up, up to the last enabled one (§4.1.4.3.2):
        VirtqueueError if one of them is disabled or has a bad size or bad rings."""
        enabled = [i for i, q in enumerate(self.queue_registers) if q.enable]
        count = enabled[-1] + 1 if enabled else 0
        indirect = bool(self.driver_features & VIRTIO_F_INDIRECT_DESC)
        return [self._virtqueue(mem, i, indirect) for i in range(count)]

    def _virtqueue(self, mem: GuestMemory, i: int, indirect: bool) -> Virtqueue:
        q = self.queue_registers[i]
        if not q.enable:
            raise VirtqueueError(f"queue {i} is disabled but a later queue is enabled")
        if not 1 <= q.size <= q.max_size or q.size & (q.size - 1):
            raise VirtqueueError(f"queue {i}: size {q.size} is not a power of 2 in 1..{q.max_size}")
        return Virtqueue(mem, q.size, q.desc, q.driver, q.device, indirect_desc=indirect)

    def _selected(self) -> VirtqueueRegisters | None:
        return self.queue_registers[self.queue_select] if self.queue_select < self.num_queues else None

    def _valid_vector(self, value: int) -> int:
        return value if value < self._msix_vectors else VIRTIO_MSI_NO_VECTOR

    # -- device status (§2.1, §3.1.1) -----------------------------------------------------------

    def _get_device_status(self) -> int:
        self._finish_reset()
        return self.status

    def _finish_reset(self) -> None:
        """Complete a started reset if the device has stopped (§2.4: status then reads 0)."""
        if self.resetting and self._reset_done():
            self.reset()

    def _set_device_status(self, value: int) -> None:
        if self.resetting:
            return  # §2.4: the driver must wait for status 0 before writing it again
        if value == 0:
            self.resetting = True
            self._on_reset()
            self._finish_reset()
            return
        old = self._status
        new = old | (value & ~VIRTIO_CONFIG_S_NEEDS_RESET & 0xFF)  # bits are only ever added
        if new & VIRTIO_CONFIG_S_FEATURES_OK and not old & VIRTIO_CONFIG_S_FEATURES_OK:
            feats = self.driver_features
            if feats & ~self.offered_features or not feats & VIRTIO_F_VERSION_1:
                log.info("%s: driver features %#x refused (offered %#x)", self.name, feats, self.offered_features)
                new &= ~VIRTIO_CONFIG_S_FEATURES_OK
        if new & VIRTIO_CONFIG_S_DRIVER_OK and not old & VIRTIO_CONFIG_S_DRIVER_OK:
            if not new & VIRTIO_CONFIG_S_FEATURES_OK:
                new &= ~VIRTIO_CONFIG_S_DRIVER_OK
            else:
                self._status = new
                self._on_driver_ok()
                return
        self._status = new

    # -- features (§2.2, §4.1.4.3) -------------------------------------------------------------

    def _get_device_feature_select(self) -> int:
        return self.device_feature_select

    def _set_device_feature_select(self, value: int) -> None:
        self.device_feature_select = value

    def _get_device_feature(self) -> int:
        sel = self.device_feature_select
        return (self.offered_features >> (32 * sel)) & 0xFFFF_FFFF if sel < FEATURE_WORDS else 0

    def _get_driver_feature_select(self) -> int:
        return self.driver_feature_select

    def _set_driver_feature_select(self, value: int) -> None:
        self.driver_feature_select = value

    def _get_driver_feature(self) -> int:
        sel = self.driver_feature_select
        return (self.driver_features >> (32 * sel)) & 0xFFFF_FFFF if sel < FEATURE_WORDS else 0

    def _set_driver_feature(self, value: int) -> None:
        sel = self.driver_feature_select
        if sel >= FEATURE_WORDS or self._status & VIRTIO_CONFIG_S_FEATURES_OK:
            return  # no such feature word, or features already fixed (§3.1.1)
        shift = 32 * sel
        self.driver_features = self.driver_features & ~(0xFFFF_FFFF << shift) | value << shift

    # -- device-wide registers ----------------------------------------------------------------

    def _get_config_msix_vector(self) -> int:
        return self.config_msix_vector

    def _set_config_msix_vector(self, value: int) -> None:
        self.config_msix_vector = self._valid_vector(value)

    def _get_num_queues(self) -> int:
        return self.num_queues

    def _get_config_generation(self) -> int:
        return self.config_generation & 0xFF

    # -- the queue selected by queue_select (§4.1.4.3.2) ---------------------------------------

    def _get_queue_select(self) -> int:
        return self.queue_select

    def _set_queue_select(self, value: int) -> None:
        self.queue_select = value

    def _get_queue_size(self) -> int:
        q = self._selected()
        return 0 if q is None else q.size

    def _set_queue_size(self, value: int) -> None:
        q = self._selected()
        if q is not None and not self.driver_ok:
            q.size = value  # validated at DRIVER_OK: a bad size fails the activation

    def _get_queue_msix_vector(self) -> int:
        q = self._selected()
        return VIRTIO_MSI_NO_VECTOR if q is None else q.msix_vector

    def _set_queue_msix_vector(self, value: int) -> None:
        q = self._selected()
        if q is not None:
            q.msix_vector = self._valid_vector(value)

    def _get_queue_enable(self) -> int:
        q = self._selected()
        return 0 if q is None else q.enable

    def _set_queue_enable(self, value: int) -> None:
        q = self._selected()
        if q is not None and value == 1 and not self.driver_ok:
            q.enable = 1  # 0 is not writable without VIRTIO_F_RING_RESET (§4.1.4.3.2)

    def _get_queue_notify_off(self) -> int:
        return self.queue_select if self.queue_select < self.num_queues else 0

    def _get_queue_desc(self) -> int:
        q = self._selected()
        return 0 if q is None else q.desc

    def _set_queue_desc(self, value: int) -> None:
        q = self._selected()
        if q is not None and not self.driver_ok:
            q.desc = value  # alignment and placement are checked at DRIVER_OK

    def _get_queue_driver(self) -> int:
        q = self._selected()
        return 0 if q is None else q.driver

    def _set_queue_driver(self, value: int) -> None:
        q = self._selected()
        if q is not None and not self.driver_ok:
            q.driver = value

    def _get_queue_device(self) -> int:
        q = self._selected()
        return 0 if q is None else q.device

    def _set_queue_device(self, value: int) -> None:
        q = self._selected()
        if q is not None and not self.driver_ok:
            q.device = value


def _zero() -> int:
    return 0
