"""The virtio 1.x modern PCI transport (virtio 1.2 section 4.1, Virtio Over PCI Bus).

`VirtioPciDevice` wraps a `VirtioDevice` as a non-transitional PCI function (4.1.2): vendor
0x1AF4, device 0x1040 + device type, revision 1, subsystem 0x1AF4:0x0040 (0x40 or above, so
legacy drivers, which match the subsystem ID against the device type, never bind).

One 64-bit, non-prefetchable memory BAR (BAR 0, `VIRTIO_BAR_SIZE` bytes) holds, each in its
own 4 KiB page:

    0x0000  common configuration  struct virtio_pci_common_cfg (4.1.4.3)
    0x1000  ISR status            1 byte, read-to-clear (4.1.4.5)
    0x2000  device configuration  forwarded to device.read_config/write_config (4.1.4.6)
    0x3000  notifications         queue i at 0x3000 + 4 * i: queue_notify_off = i,
                                  notify_off_multiplier = 4 (4.1.4.4)
    0x4000  MSI-X table           one vector per queue plus one for configuration changes
    0x5000  MSI-X PBA

described by vendor-specific capabilities (`struct virtio_pci_cap`, cap_vndr 0x09) of types
COMMON, NOTIFY (`struct virtio_pci_notify_cap`), ISR, DEVICE and PCI_CFG
(`struct virtio_pci_cfg_cap`, the access window through configuration space that 4.1.4.9
requires), plus the MSI-X capability.

Interrupts are MSI-X only: the function has no INTx pin (Interrupt Pin 0), so with
queue_msix_vector or config_msix_vector = VIRTIO_MSI_NO_VECTOR the device only sets the ISR
bit. Linux's virtio_pci always uses MSI-X when the capability is present.

Device status (2.1, 3.1.1): the driver only adds bits; writing 0 resets. FEATURES_OK sticks
only when the driver's features are a subset of the offered ones (VIRTIO_F_VERSION_1 plus the
device's) and include VIRTIO_F_VERSION_1. DRIVER_OK (after FEATURES_OK) builds a `Virtqueue`
per enabled queue and activates the device; a bad queue (size, addresses) sets
DEVICE_NEEDS_RESET and sends a configuration-change interrupt instead. Each active queue gets
an eventfd, declared as an ioeventfd (2-byte write at its notify address) that the host bridge
attaches; a notify write that still reaches Python signals the same eventfd.

Reset (writing 0 to device_status): device.reset(), queues and eventfds torn down (ioeventfds
detached first), features, selectors, status and ISR cleared, every queue register back to
its reset value (queue_size = the maximum, queue_msix_vector = NO_VECTOR, ...), and
config_msix_vector = NO_VECTOR. The MSI-X table itself is PCI function state that a virtio
reset does not touch (only a PCI-level reset would); Linux keeps its MSI-X vectors across a
virtio reset.

Locking: one lock guards the transport's registers. The host bridge may call `ioeventfds()`
while a vCPU holds it, so that method reads a tuple that is replaced, never mutated.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from ...errors import GuestMemoryError
from ...interrupts import InterruptController
from ...memory import GuestMemory
from ...pci.config import PciConfigSpace
from ...pci.device import BarRouter, IoEventFd, PciDevice, SubRegion
from ...pci.msix import MsixTable
from ...pci.registers import Register, RegisterBlock
from ...pci.regs import PCI_CAP_ID_VNDR, PCI_CLASS_OTHERS
from .device import VIRTIO_F_VERSION_1, VirtioDevice
from .queue import VIRTIO_F_INDIRECT_DESC, Virtqueue, VirtqueueError

log = logging.getLogger(__name__)

# include/uapi/linux/virtio_pci.h
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
VIRTIO_MSI_NO_VECTOR = 0xFFFF
VIRTIO_PCI_ISR_QUEUE = 0x1  # 4.1.4.5: bit 0, queue interrupt
VIRTIO_PCI_ISR_CONFIG = 0x2  # bit 1, device configuration change

# include/uapi/linux/virtio_config.h (2.1 Device Status Field)
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_MODERN_DEVICE_ID_BASE = 0x1040  # 4.1.2: 0x1040 + device type
VIRTIO_PCI_REVISION = 1
VIRTIO_PCI_SUBSYSTEM_ID = 0x0040

# 4.1.2.1 leaves the class to the device; these are the conventional ones (virtio-pmem is
# "other", like QEMU's virtio-pmem-pci).
VIRTIO_PCI_CLASS_CODES = {
    1: 0x020000,  # network: Ethernet controller
    2: 0x018000,  # block: mass storage, other
    3: 0x078000,  # console: simple communication, other
}

# struct virtio_pci_cap { u8 cap_vndr, cap_next, cap_len, cfg_type, bar, id; u8 padding[2];
#                         le32 offset, length; }
virtio_pci_cap = struct.Struct("<BBBBBB2xII")
# struct virtio_pci_notify_cap { struct virtio_pci_cap cap; le32 notify_off_multiplier; }
virtio_pci_notify_cap = struct.Struct("<BBBBBB2xIII")
# struct virtio_pci_cfg_cap { struct virtio_pci_cap cap; u8 pci_cfg_data[4]; }
virtio_pci_cfg_cap = struct.Struct("<BBBBBB2xII4s")
PCI_CFG_BAR, PCI_CFG_OFFSET, PCI_CFG_LENGTH, PCI_CFG_DATA = 4, 8, 12, 16  # offsets in the cap

# struct virtio_pci_common_cfg (4.1.4.3), with the two 1.2 fields at the end.
VIRTIO_PCI_COMMON_CFG: tuple[Register, ...] = (
    Register(0x00, 4, "device_feature_select"),
    Register(0x04, 4, "device_feature", writable=False),
    Register(0x08, 4, "driver_feature_select"),
    Register(0x0C, 4, "driver_feature"),
    Register(0x10, 2, "config_msix_vector"),  # Linux: msix_config
    Register(0x12, 2, "num_queues", writable=False),
    Register(0x14, 1, "device_status"),
    Register(0x15, 1, "config_generation", writable=False),
    Register(0x16, 2, "queue_select"),
    Register(0x18, 2, "queue_size"),
    Register(0x1A, 2, "queue_msix_vector"),
    Register(0x1C, 2, "queue_enable"),
    Register(0x1E, 2, "queue_notify_off", writable=False),
    Register(0x20, 8, "queue_desc"),
    Register(0x28, 8, "queue_driver"),
    Register(0x30, 8, "queue_device"),
    Register(0x38, 2, "queue_notify_data", writable=False),  # VIRTIO_F_NOTIF_CONFIG_DATA: not offered
    Register(0x3A, 2, "queue_reset", writable=False),  # VIRTIO_F_RING_RESET: not offered
)

VIRTIO_BAR = 0
COMMON_CFG_OFFSET = 0x0000
ISR_CFG_OFFSET = 0x1000
DEVICE_CFG_OFFSET = 0x2000
DEVICE_CFG_SIZE = 0x1000
NOTIFY_CFG_OFFSET = 0x3000
NOTIFY_OFF_MULTIPLIER = 4
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x5000
VIRTIO_BAR_SIZE = 0x8000
PAGE = 0x1000
MAX_QUEUES = (MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) // 16 - 1  # one MSI-X vector each + config
NOTIFY_WRITE_SIZE = 2  # Linux vp_notify: iowrite16(queue index)


@dataclass
class _QueueRegs:
    """The per-queue registers behind queue_select, with their reset values (4.1.4.3.1)."""

    max_size: int
    size: int = 0
    msix_vector: int = VIRTIO_MSI_NO_VECTOR
    enable: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0

    def __post_init__(self) -> None:
        self.size = self.max_size


class _Common:
    """struct virtio_pci_common_cfg, accessed under the transport lock."""

    def __init__(self, t: VirtioPciDevice) -> None:
        self._t = t

    def read(self, offset: int, size: int) -> int:
        with self._t._lock:
            return self._t.common.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._t._lock:
            self._t.common.write(offset, size, value)


class _Isr:
    def __init__(self, t: VirtioPciDevice) -> None:
        self._t = t

    def read(self, offset: int, size: int) -> int:
        return self._t._read_isr() if offset == 0 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class _DeviceCfg:
    def __init__(self, t: VirtioPciDevice) -> None:
        self._t = t

    def read(self, offset: int, size: int) -> int:
        return self._t.device.read_config(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._t.device.write_config(offset, size, value)


class _Notify:
    def __init__(self, t: VirtioPciDevice) -> None:
        self._t = t

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset % NOTIFY_OFF_MULTIPLIER == 0:
            self._t._notify_from_python(offset // NOTIFY_OFF_MULTIPLIER)


class VirtioPciDevice(PciDevice):
    """A `VirtioDevice` behind the modern virtio-pci transport; plug it into a `PciHostBridge`."""

    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        interrupts: InterruptController,
        *,
        class_code: int | None = None,
        name: str | None = None,
    ) -> None:
        nq = len(device.queue_max_sizes)
        if nq > MAX_QUEUES:
            raise ValueError(f"{nq} virtqueues: at most {MAX_QUEUES}")
        if class_code is None:
            class_code = VIRTIO_PCI_CLASS_CODES.get(device.device_id, PCI_CLASS_OTHERS)
        config = PciConfigSpace(
            vendor_id=VIRTIO_PCI_VENDOR_ID,
            device_id=VIRTIO_PCI_MODERN_DEVICE_ID_BASE + device.device_id,
            class_code=class_code,
            revision_id=VIRTIO_PCI_REVISION,
            subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
            subsystem_id=VIRTIO_PCI_SUBSYSTEM_ID,
        )
        super().__init__(config, name or f"virtio-{device.device_id}")
        self.device = device
        self.mem = mem
        self.num_queues = nq
        self._lock = threading.RLock()  # the registers; never held by signal_used/needs_reset
        self._irq_lock = threading.Lock()  # ISR read-to-clear against the signalling threads
        self._device_error = False  # DEVICE_NEEDS_RESET, set from any thread
        self._config_generation = 0
        self.common = RegisterBlock(VIRTIO_PCI_COMMON_CFG, self)
        self.msix = MsixTable(
            nq + 1,
            interrupts,
            table_bar=VIRTIO_BAR,
            table_offset=MSIX_TABLE_OFFSET,
            pba_bar=VIRTIO_BAR,
            pba_offset=MSIX_PBA_OFFSET,
        )
        self.notify_length = max(nq * NOTIFY_OFF_MULTIPLIER, NOTIFY_WRITE_SIZE)
        self.router = BarRouter(
            VIRTIO_BAR_SIZE,
            (
                SubRegion(COMMON_CFG_OFFSET, PAGE, _Common(self), "common"),
                SubRegion(ISR_CFG_OFFSET, PAGE, _Isr(self), "isr"),
                SubRegion(DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE, _DeviceCfg(self), "device"),
                SubRegion(NOTIFY_CFG_OFFSET, PAGE, _Notify(self), "notify"),
                SubRegion(MSIX_TABLE_OFFSET, self.msix.table_size, self.msix.table, "msix-table"),
                SubRegion(MSIX_PBA_OFFSET, self.msix.pba_size, self.msix.pba, "msix-pba"),
            ),
        )
        self.add_bar(VIRTIO_BAR, VIRTIO_BAR_SIZE, self.router, mem64=True, prefetchable=False)
        self._add_virtio_caps()
        self.msix.add_to(config)
        self._ioeventfds: tuple[IoEventFd, ...] = ()
        self._notify_fds: list[int] = []
        self.queues: list[Virtqueue] = []
        self.activations = 0
        self._reset_registers()

    # -- capabilities (4.1.4) ---------------------------------------------------------------

    def _add_virtio_caps(self) -> None:
        cfg = self.config
        for cfg_type, offset, length in (
            (VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG_OFFSET, self.common.size),
            (VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, 1),
            (VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE),
        ):
            cfg.add_capability(
                PCI_CAP_ID_VNDR,
                virtio_pci_cap.pack(PCI_CAP_ID_VNDR, 0, virtio_pci_cap.size, cfg_type, VIRTIO_BAR, 0, offset, length),
            )
        cfg.add_capability(
            PCI_CAP_ID_VNDR,
            virtio_pci_notify_cap.pack(
                PCI_CAP_ID_VNDR,
                0,
                virtio_pci_notify_cap.size,
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                VIRTIO_BAR,
                0,
                NOTIFY_CFG_OFFSET,
                self.notify_length,
                NOTIFY_OFF_MULTIPLIER,
            ),
        )
        # 4.1.4.9: bar, offset, length and pci_cfg_data are driver-writable.
        wmask = virtio_pci_cfg_cap.pack(0, 0, 0, 0, 0xFF, 0, 0xFFFF_FFFF, 0xFFFF_FFFF, b"\xff" * 4)
        self._pci_cfg_cap = cfg.add_capability(
            PCI_CAP_ID_VNDR,
            virtio_pci_cfg_cap.pack(
                PCI_CAP_ID_VNDR, 0, virtio_pci_cfg_cap.size, VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, 0, bytes(4)
            ),
            wmask,
            on_read=self._pci_cfg_read,
            on_write=self._pci_cfg_write,
        )

    def _pci_cfg_window(self) -> tuple[int, int] | None:
        """(offset, length) the PCI_CFG capability currently selects, if it is usable."""
        base = self._pci_cfg_cap
        bar = self.config.get(base + PCI_CFG_BAR, 1)
        offset = self.config.get(base + PCI_CFG_OFFSET, 4)
        length = self.config.get(base + PCI_CFG_LENGTH, 4)
        if bar != VIRTIO_BAR or length not in (1, 2, 4) or offset % length or offset + length > VIRTIO_BAR_SIZE:
            return None
        return offset, length

    def _pci_cfg_read(self, offset: int, size: int) -> None:
        if offset + size <= PCI_CFG_DATA:
            return
        window = self._pci_cfg_window()
        value = 0 if window is None else self.router.read(*window)
        self.config.set(self._pci_cfg_cap + PCI_CFG_DATA, 4, value)

    def _pci_cfg_write(self, offset: int, size: int) -> None:
        if offset + size <= PCI_CFG_DATA:
            return
        window = self._pci_cfg_window()
        if window is not None:
            value = self.config.get(self._pci_cfg_cap + PCI_CFG_DATA, window[1])
            self.router.write(window[0], window[1], value)

    # -- what the host bridge asks --------------------------------------------------------------

    def ioeventfds(self) -> Sequence[IoEventFd]:
        return self._ioeventfds

    def notify_offset(self, queue: int) -> int:
        """Offset in BAR 0 of queue `queue`'s notification address."""
        return NOTIFY_CFG_OFFSET + queue * NOTIFY_OFF_MULTIPLIER

    # -- state ------------------------------------------------------------------------------

    @property
    def offered_features(self) -> int:
        return (self.device.device_features | VIRTIO_F_VERSION_1) & ((1 << 64) - 1)

    @property
    def status(self) -> int:
        """device_status as the driver reads it."""
        return self._status | (VIRTIO_CONFIG_S_NEEDS_RESET if self._device_error else 0)

    @property
    def driver_features(self) -> int:
        return self._driver_features

    def _reset_registers(self) -> None:
        self._device_feature_select = 0
        self._driver_feature_select = 0
        self._driver_features = 0
        self._config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self._status = 0
        self._queue_select = 0
        self._queues = [_QueueRegs(m) for m in self.device.queue_max_sizes]
        self._isr = 0
        self._device_error = False

    def _selected(self) -> _QueueRegs | None:
        return self._queues[self._queue_select] if self._queue_select < self.num_queues else None

    def _live(self) -> bool:
        return bool(self._status & VIRTIO_CONFIG_S_DRIVER_OK)

    def _valid_vector(self, value: int) -> int:
        return value if value < self.msix.nvectors else VIRTIO_MSI_NO_VECTOR

    # -- struct virtio_pci_common_cfg accessors (RegisterBlock) -----------------------------------

    def _get_device_feature_select(self) -> int:
        return self._device_feature_select

    def _set_device_feature_select(self, value: int) -> None:
        self._device_feature_select = value

    def _get_device_feature(self) -> int:
        sel = self._device_feature_select
        return (self.offered_features >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0

    def _get_driver_feature_select(self) -> int:
        return self._driver_feature_select

    def _set_driver_feature_select(self, value: int) -> None:
        self._driver_feature_select = value

    def _get_driver_feature(self) -> int:
        sel = self._driver_feature_select
        return (self._driver_features >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0

    def _set_driver_feature(self, value: int) -> None:
        sel = self._driver_feature_select
        if sel >= 2 or self._status & VIRTIO_CONFIG_S_FEATURES_OK:
            return  # no such feature word, or features already fixed (3.1.1)
        shift = 32 * sel
        self._driver_features = self._driver_features & ~(0xFFFF_FFFF << shift) | value << shift

    def _get_config_msix_vector(self) -> int:
        return self._config_msix_vector

    def _set_config_msix_vector(self, value: int) -> None:
        self._config_msix_vector = self._valid_vector(value)

    def _get_num_queues(self) -> int:
        return self.num_queues

    def _get_device_status(self) -> int:
        return self.status

    def _set_device_status(self, value: int) -> None:
        if value == 0:
            self.reset()
        else:
            self._update_status(value)

    def _get_config_generation(self) -> int:
        return self._config_generation & 0xFF

    def _get_queue_select(self) -> int:
        return self._queue_select

    def _set_queue_select(self, value: int) -> None:
        self._queue_select = value

    def _get_queue_size(self) -> int:
        q = self._selected()
        return 0 if q is None else q.size

    def _set_queue_size(self, value: int) -> None:
        q = self._selected()
        if q is not None and not self._live():
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
        if q is not None and value == 1 and not self._live():
            q.enable = 1  # 0 is not writable without VIRTIO_F_RING_RESET (4.1.4.3.2)

    def _get_queue_notify_off(self) -> int:
        return self._queue_select if self._queue_select < self.num_queues else 0

    def _get_queue_desc(self) -> int:
        q = self._selected()
        return 0 if q is None else q.desc

    def _set_queue_desc(self, value: int) -> None:
        q = self._selected()
        if q is not None and not self._live():
            q.desc = value  # alignment and placement are checked at DRIVER_OK

    def _get_queue_driver(self) -> int:
        q = self._selected()
        return 0 if q is None else q.driver

    def _set_queue_driver(self, value: int) -> None:
        q = self._selected()
        if q is not None and not self._live():
            q.driver = value

    def _get_queue_device(self) -> int:
        q = self._selected()
        return 0 if q is None else q.device

    def _set_queue_device(self, value: int) -> None:
        q = self._selected()
        if q is not None and not self._live():
            q.device = value

    def _get_queue_notify_data(self) -> int:
        return 0

    def _get_queue_reset(self) -> int:
        return 0

    # -- status machine (2.1, 3.1.1) -------------------------------------------------------------

    def _update_status(self, value: int) -> None:
        old = self._status
        new = old | (value & ~VIRTIO_CONFIG_S_NEEDS_RESET & 0xFF)  # bits are only ever added
        if new & VIRTIO_CONFIG_S_FEATURES_OK and not old & VIRTIO_CONFIG_S_FEATURES_OK:
            feats = self._driver_features
            if feats & ~self.offered_features or not feats & VIRTIO_F_VERSION_1:
                log.info("%s: driver features %#x refused (offered %#x)", self.name, feats, self.offered_features)
                new &= ~VIRTIO_CONFIG_S_FEATURES_OK
        if new & VIRTIO_CONFIG_S_DRIVER_OK and not old & VIRTIO_CONFIG_S_DRIVER_OK:
            if not new & VIRTIO_CONFIG_S_FEATURES_OK:
                new &= ~VIRTIO_CONFIG_S_DRIVER_OK
            else:
                self._status = new
                self._activate()
                return
        self._status = new

    def _activate(self) -> None:
        enabled = [i for i, q in enumerate(self._queues) if q.enable]
        count = enabled[-1] + 1 if enabled else 0
        try:
            queues = [self._build_queue(i) for i in range(count)]
        except VirtqueueError as exc:
            log.warning("%s: cannot activate: %s", self.name, exc)
            self._set_needs_reset()
            return
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in queues]
        self.queues, self._notify_fds = queues, fds
        self._ioeventfds = tuple(
            IoEventFd(VIRTIO_BAR, self.notify_offset(i), NOTIFY_WRITE_SIZE, fd) for i, fd in enumerate(fds)
        )
        self.mapping_changed()
        try:
            self.device.activate(self.mem, queues, fds, self.signal_used, self.needs_reset)
        except (VirtqueueError, GuestMemoryError) as exc:
            log.warning("%s: activation failed: %s", self.name, exc)
            self._set_needs_reset()
            return
        self.activations += 1

    def _build_queue(self, i: int) -> Virtqueue:
        q = self._queues[i]
        if not q.enable:
            raise VirtqueueError(f"queue {i} is disabled but a later queue is enabled")
        if not 1 <= q.size <= q.max_size or q.size & (q.size - 1):
            raise VirtqueueError(f"queue {i}: size {q.size} is not a power of 2 in 1..{q.max_size}")
        indirect = bool(self._driver_features & VIRTIO_F_INDIRECT_DESC)
        return Virtqueue(self.mem, q.size, q.desc, q.driver, q.device, indirect_desc=indirect)

    def reset(self) -> None:
        """Device reset (device_status := 0, 4.1.4.3.1): back to the power-on state."""
        with self._lock:
            self.device.reset()
            fds, self._notify_fds = self._notify_fds, []
            self._ioeventfds = ()
            self.queues = []
            self.mapping_changed()  # the bridge detaches the ioeventfds before they close
            for fd in fds:
                os.close(fd)
            self._reset_registers()

    # -- interrupts and notifications ------------------------------------------------------------

    # signal_used, needs_reset and config_changed run on device threads: they never take the
    # register lock, which a vCPU may hold while device.reset() waits for those threads.

    def _read_isr(self) -> int:
        with self._irq_lock:
            isr, self._isr = self._isr, 0
        return isr

    def signal_used(self, queue: int) -> None:
        """The device put buffers in queue `queue`'s used ring: interrupt the driver (4.1.5.2)."""
        queues = self._queues
        if not 0 <= queue < len(queues):
            return
        with self._irq_lock:
            self._isr |= VIRTIO_PCI_ISR_QUEUE
        vector = queues[queue].msix_vector
        if vector != VIRTIO_MSI_NO_VECTOR:
            self.msix.notify(vector)

    def _signal_config(self) -> None:
        with self._irq_lock:
            self._isr |= VIRTIO_PCI_ISR_CONFIG
        vector = self._config_msix_vector
        if vector != VIRTIO_MSI_NO_VECTOR:
            self.msix.notify(vector)

    def _set_needs_reset(self) -> None:
        self._device_error = True
        self._signal_config()

    def needs_reset(self) -> None:
        """The device hit a driver error: DEVICE_NEEDS_RESET + configuration interrupt (2.1.2)."""
        self._set_needs_reset()

    def config_changed(self) -> None:
        """The device changed its configuration: bump config_generation and interrupt (4.1.5.3)."""
        self._config_generation += 1  # single writer: the device
        self._signal_config()

    def _notify_from_python(self, queue: int) -> None:
        """A notify write that KVM did not catch (no ioeventfd yet): signal the same eventfd."""
        with self._lock:  # reset() closes the fds under this lock
            if 0 <= queue < len(self._notify_fds):
                os.eventfd_write(self._notify_fds[queue], 1)

    def close(self) -> None:
        self.reset()
        self.msix.close()
