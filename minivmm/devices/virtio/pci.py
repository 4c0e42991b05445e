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

The common configuration and the device status machine (feature negotiation, queue
registers, reset values) are `VirtioPciCommonConfig` (common_config.py); this module is the
PCI side: the function's identity, the BAR layout and capabilities, ISR, notifications and
MSI-X interrupts, and what DRIVER_OK and a reset do to the running device.

Interrupts (4.1.4.5, 4.1.5). Every notification sets its ISR status bit; with MSI-X enabled
it is also sent to the queue's (or the configuration's) MSI-X vector, if one is set. With MSI-X
disabled (a guest booted with ``pci=nomsi``, or a driver that could not get vectors) the
function uses its INTx pin, INTA# (Interrupt Pin 1), which the host bridge wires to the GSI the
DSDT's _PRT names: the pin is asserted while ISR status is non-zero, MSI-X is disabled and
PCI_COMMAND_INTX_DISABLE is clear; PCI_STATUS_INTERRUPT shows the same state without the
Interrupt Disable bit (PCI 3.0 section 6.2.3). Reading ISR status clears it (read-to-clear)
and so deasserts the pin. Level changes go to the line at once from whichever thread made
them: the flusher thread's completion raises the GSI itself with KVM_IRQ_LINE (no vCPU round
trip; an irqfd with KVM_IRQFD_FLAG_RESAMPLE is not used - the deassert needs the ISR read,
which is an MMIO exit into Python anyway).

Activation (DRIVER_OK, 3.1.1): a `Virtqueue` per enabled queue, then the device is activated;
a bad queue (size, addresses) sets DEVICE_NEEDS_RESET and sends a configuration-change
interrupt instead. Each active queue gets an eventfd, declared as an ioeventfd (2-byte write
at its notify address) that the host bridge attaches; a notify write that still reaches
Python signals the same eventfd.

Reset (writing 0 to device_status, 2.4) never blocks the vCPU: the write detaches the
ioeventfds and calls device.begin_reset(), then returns. device_status reads non-zero until
device.reset_done() (checked on each read); only then are the queues and eventfds torn down,
the ISR cleared and the common configuration put back to its reset values, so no completion,
interrupt or guest-memory write follows a read of 0. The MSI-X table itself is PCI function state that a virtio reset does not touch (only
a PCI-level reset would); Linux keeps its MSI-X vectors across a virtio reset.

Locking: one lock guards the transport's registers. The host bridge may call `ioeventfds()`
while a vCPU holds it, so that method reads a tuple that is replaced, never mutated.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable, Sequence

from ...errors import GuestMemoryError
from ...interrupts import InterruptController, InterruptLine
from ...memory import GuestMemory
from ...pci.config import PciConfigSpace
from ...pci.device import BarRouter, IoEventFd, PciDevice, SubRegion
from ...pci.msix import MsixTable
from ...pci.pci_regs import PCI_CAP_ID_VNDR, PCI_CLASS_OTHERS, PCI_COMMAND_INTX_DISABLE, PCI_INTERRUPT_PIN
from ...register_block import Register, RegisterBlock
from .common_config import VIRTIO_MSI_NO_VECTOR, VirtioPciCommonConfig
from .device import VirtioDevice
from .queue import Virtqueue, VirtqueueError

log = logging.getLogger(__name__)

# include/uapi/linux/virtio_pci.h
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
VIRTIO_PCI_ISR_QUEUE = 0x1  # 4.1.4.5: bit 0, queue interrupt
VIRTIO_PCI_ISR_CONFIG = 0x2  # bit 1, device configuration change

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
PCI_INTERRUPT_PIN_INTA = 1  # PCI 3.0 section 6.2.4


class _Locked:
    """A register block accessed under the transport's register lock."""

    def __init__(self, lock: threading.RLock, block: RegisterBlock) -> None:
        self._lock = lock
        self._block = block

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            return self._block.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._block.write(offset, size, value)

    def describe(self, offset: int, size: int, value: int, is_write: bool) -> str | None:
        return self._block.describe(offset, size, value, is_write)


class _DeviceCfg:
    """The device-specific configuration (4.1.4.6), forwarded to the device."""

    def __init__(self, device: VirtioDevice) -> None:
        self._device = device

    def read(self, offset: int, size: int) -> int:
        return self._device.read_config(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._device.write_config(offset, size, value)

    def describe(self, offset: int, size: int, value: int, is_write: bool) -> str | None:
        return f"+{offset:#x} {'=' if is_write else '->'} {value:#x}"


class _Notify:
    """Queue notifications (4.1.4.4) that no ioeventfd caught."""

    def __init__(self, notify: Callable[[int], None]) -> None:
        self._notify = notify

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset % NOTIFY_OFF_MULTIPLIER == 0:
            self._notify(offset // NOTIFY_OFF_MULTIPLIER)

    def describe(self, offset: int, size: int, value: int, is_write: bool) -> str | None:
        return f"queue {offset // NOTIFY_OFF_MULTIPLIER} notified (no ioeventfd caught it)" if is_write else None


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
        self._irq_lock = threading.Lock()  # ISR and INTx level; a leaf lock (may be taken under the config lock)
        self._isr = 0
        self._intx: InterruptLine | None = None
        self._intx_level = False
        config.set(PCI_INTERRUPT_PIN, 1, PCI_INTERRUPT_PIN_INTA)
        config.interrupt_status = self._intx_pending
        config.after_write = self._config_written
        self.msix = MsixTable(
            nq + 1,
            interrupts,
            table_bar=VIRTIO_BAR,
            table_offset=MSIX_TABLE_OFFSET,
            pba_bar=VIRTIO_BAR,
            pba_offset=MSIX_PBA_OFFSET,
        )
        self.common_cfg = VirtioPciCommonConfig(
            device,
            self.msix.nvectors,
            on_driver_ok=self._activate,
            on_reset=self._begin_reset,
            reset_done=self._reset_done,
            name=self.name,
        )
        self.notify_length = max(nq * NOTIFY_OFF_MULTIPLIER, NOTIFY_WRITE_SIZE)
        isr = RegisterBlock((Register(0, 1, "isr_status", self._read_isr),))  # read-to-clear (4.1.4.5)
        self.router = BarRouter(
            VIRTIO_BAR_SIZE,
            (
                SubRegion(COMMON_CFG_OFFSET, PAGE, _Locked(self._lock, self.common_cfg.registers), "common_cfg"),
                SubRegion(ISR_CFG_OFFSET, PAGE, isr, "isr_cfg"),
                SubRegion(DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE, _DeviceCfg(device), "device_cfg"),
                SubRegion(NOTIFY_CFG_OFFSET, PAGE, _Notify(self._notify_from_python), "notify_cfg"),
                SubRegion(MSIX_TABLE_OFFSET, self.msix.table_size, self.msix.table, "msix-table"),
                SubRegion(MSIX_PBA_OFFSET, self.msix.pba_size, self.msix.pba, "msix-pba"),
            ),
            label="virtio",
        )
        self.add_bar(VIRTIO_BAR, VIRTIO_BAR_SIZE, self.router, mem64=True, prefetchable=False)
        self._add_virtio_caps()
        self.msix.add_to(config)
        self._ioeventfds: tuple[IoEventFd, ...] = ()
        self._notify_fds: list[int] = []
        self.queues: list[Virtqueue] = []
        self.activations = 0

    # -- capabilities (4.1.4) ---------------------------------------------------------------

    def _add_virtio_caps(self) -> None:
        cfg = self.config
        for cfg_type, offset, length in (
            (VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG_OFFSET, self.common_cfg.registers.size),
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
    def driver_features(self) -> int:
        return self.common_cfg.driver_features

    # -- DRIVER_OK and reset (3.1.1, 2.4) ---------------------------------------------------------

    def _activate(self) -> None:
        """DRIVER_OK was set (register lock held): start the device on the driver's queues."""
        try:
            queues = self.common_cfg.virtqueues(self.mem)
        except VirtqueueError as exc:
            log.warning("%s: cannot activate: %s", self.name, exc)
            self.needs_reset()
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
            self.needs_reset()
            return
        self.activations += 1

    def _begin_reset(self) -> None:
        """device_status := 0 (register lock held, on a vCPU thread): stop without waiting."""
        self._ioeventfds = ()
        self.mapping_changed()  # guest notifies stop reaching the device's eventfds
        self.device.begin_reset()

    def _reset_done(self) -> bool:
        """Register lock held: if the device has stopped, release what it used; True then."""
        if not self.device.reset_done():
            return False
        self._release_queues()
        return True

    def _release_queues(self) -> None:
        fds, self._notify_fds = self._notify_fds, []
        self._ioeventfds = ()
        self.queues = []
        self.mapping_changed()  # the bridge detaches the ioeventfds before they close
        for fd in fds:
            os.close(fd)
        with self._irq_lock:
            self._isr = 0
            self._update_intx()

    def reset(self) -> None:
        """Device reset, waiting for the device to stop (4.1.4.3.1): back to the power-on state."""
        with self._lock:
            self.device.reset()
            self._release_queues()
            self.common_cfg.reset()

    # -- interrupts and notifications ------------------------------------------------------------

    # signal_used, needs_reset and config_changed run on device threads: they never take the
    # register lock, which a vCPU may hold while device.reset() waits for those threads.

    def connect_intx(self, line: InterruptLine) -> None:
        """The host bridge wired INTA# to `line` (a GSI per the DSDT's _PRT)."""
        with self._irq_lock:
            self._intx, self._intx_level = line, False
            self._update_intx()

    def _intx_pending(self) -> bool:
        """The INTx interrupt state (PCI_STATUS_INTERRUPT): ISR set and MSI-X off (4.1.4.5.1)."""
        return self._isr != 0 and not self.msix.enabled

    def _update_intx(self) -> None:
        """Drive the pin to its level (caller holds the irq lock, so changes stay in order)."""
        level = self._intx_pending() and not self.config.command & PCI_COMMAND_INTX_DISABLE
        if self._intx is not None and level != self._intx_level:
            self._intx_level = level
            self._intx.set_level(level)

    def _config_written(self, offset: int, size: int) -> None:
        """After any config write: Interrupt Disable or the MSI-X enable bit may have changed."""
        with self._irq_lock:
            self._update_intx()

    def _set_isr(self, bits: int) -> None:
        with self._irq_lock:
            self._isr |= bits
            self._update_intx()

    def _read_isr(self) -> int:
        with self._irq_lock:
            isr, self._isr = self._isr, 0
            self._update_intx()  # read-to-clear deasserts INTx (4.1.4.5)
        return isr

    def signal_used(self, queue: int) -> None:
        """The device put buffers in queue `queue`'s used ring: interrupt the driver (4.1.5.2)."""
        queues = self.common_cfg.queue_registers
        if not 0 <= queue < len(queues):
            return
        self._set_isr(VIRTIO_PCI_ISR_QUEUE)
        vector = queues[queue].msix_vector
        if vector != VIRTIO_MSI_NO_VECTOR and self.msix.enabled:
            self.msix.notify(vector)

    def _signal_config(self) -> None:
        self._set_isr(VIRTIO_PCI_ISR_CONFIG)
        vector = self.common_cfg.config_msix_vector
        if vector != VIRTIO_MSI_NO_VECTOR and self.msix.enabled:
            self.msix.notify(vector)

    def needs_reset(self) -> None:
        """The device hit a driver error: DEVICE_NEEDS_RESET + configuration interrupt (2.1.2)."""
        self.common_cfg.needs_reset = True
        self._signal_config()

    def config_changed(self) -> None:
        """The device changed its configuration: bump config_generation and interrupt (4.1.5.3)."""
        self.common_cfg.config_generation += 1  # single writer: the device
        self._signal_config()

    def _notify_from_python(self, queue: int) -> None:
        """A notify write that KVM did not catch (no ioeventfd yet): signal the same eventfd."""
        with self._lock:  # reset() closes the fds under this lock
            if 0 <= queue < len(self._notify_fds):
                os.eventfd_write(self._notify_fds[queue], 1)

    def close(self) -> None:
        self.reset()
        self.msix.close()
