"""The virtio 1.x modern PCI transport, driven the way Linux's virtio_pci_modern does."""

from __future__ import annotations

import os
import struct
import time

import pytest

from minivmm.bus import Bus
from minivmm.devices.virtio.common_config import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_MSI_NO_VECTOR,
    VirtioPciCommonConfig,
)
from minivmm.devices.virtio.device import VIRTIO_F_VERSION_1
from minivmm.devices.virtio.pci import (
    COMMON_CFG_OFFSET,
    DEVICE_CFG_OFFSET,
    ISR_CFG_OFFSET,
    MSIX_TABLE_OFFSET,
    NOTIFY_CFG_OFFSET,
    VIRTIO_BAR_SIZE,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_PCI_CFG,
    VirtioPciDevice,
)
from minivmm.devices.virtio.queue import Virtqueue
from minivmm.memory import GuestMemory
from support.fakes import FakeInterruptController, FakeIoEventRegistry, GuestConf1
from minivmm import layout
from minivmm.allocator import AddressAllocator
from minivmm.pci.host import PciHostBridge
from minivmm.ranges import AddressRange
from minivmm.pci.pci_regs import (
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_VNDR,
    PCI_CLASS_REVISION,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_MSIX_TABLE,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
)

F_DEV_LOW = 1 << 0
F_DEV_HIGH = 1 << 35  # VIRTIO_F_IN_ORDER: a device bit above 32
# struct virtio_pci_common_cfg (virtio 1.2 section 4.1.4.3): name -> (offset, size), written
# out from the spec so that the transport's register table is checked against it.
OFFS = {
    "device_feature_select": (0x00, 4),
    "device_feature": (0x04, 4),
    "driver_feature_select": (0x08, 4),
    "driver_feature": (0x0C, 4),
    "config_msix_vector": (0x10, 2),
    "num_queues": (0x12, 2),
    "device_status": (0x14, 1),
    "config_generation": (0x15, 1),
    "queue_select": (0x16, 2),
    "queue_size": (0x18, 2),
    "queue_msix_vector": (0x1A, 2),
    "queue_enable": (0x1C, 2),
    "queue_notify_off": (0x1E, 2),
    "queue_desc": (0x20, 8),
    "queue_driver": (0x28, 8),
    "queue_device": (0x30, 8),
    "queue_notify_data": (0x38, 2),
    "queue_reset": (0x3A, 2),
}
MB = 1 << 20


class FakeDevice:
    device_id = 27  # virtio-pmem
    device_features = F_DEV_LOW | F_DEV_HIGH

    def __init__(self, queue_max_sizes=(256,)) -> None:
        self.queue_max_sizes = list(queue_max_sizes)
        self.config = bytearray(struct.pack("<QQ", 0x1_4000_0000, 0x4000_0000))
        self.activated: list[tuple] = []
        self.resets = 0

    def read_config(self, offset: int, size: int) -> int:
        if offset + size > len(self.config):
            return 0
        return int.from_bytes(self.config[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass

    def activate(self, mem, queues, notify_fds, signal_used, needs_reset) -> None:
        self.activated.append((mem, list(queues), list(notify_fds), signal_used, needs_reset))

    def begin_reset(self) -> None:
        self.resets += 1

    def reset_done(self) -> bool:
        return True

    def reset(self) -> None:
        self.begin_reset()


class Driver:
    """Register access to BAR 0 of the transport, in natural widths."""

    def __init__(self, t: VirtioPciDevice) -> None:
        self.t = t

    def read(self, name: str) -> int:
        off, size = OFFS[name]
        if size == 8:
            return self.t.router.read(off, 4) | self.t.router.read(off + 4, 4) << 32
        return self.t.router.read(COMMON_CFG_OFFSET + off, size)

    def write(self, name: str, value: int) -> None:
        off, size = OFFS[name]
        if size == 8:  # vp_iowrite64_twopart
            self.t.router.write(off, 4, value & 0xFFFF_FFFF)
            self.t.router.write(off + 4, 4, value >> 32)
        else:
            self.t.router.write(COMMON_CFG_OFFSET + off, size, value)

    def negotiate(self, features: int) -> int:
        for s in (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER):
            self.write("device_status", self.read("device_status") | s)
        for sel in (0, 1):
            self.write("driver_feature_select", sel)
            self.write("driver_feature", (features >> (32 * sel)) & 0xFFFF_FFFF)
        self.write("device_status", self.read("device_status") | VIRTIO_CONFIG_S_FEATURES_OK)
        return self.read("device_status")

    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int, vector: int = 1) -> None:
        self.write("queue_select", index)
        self.write("queue_size", size)
        self.write("queue_msix_vector", vector)
        self.write("queue_desc", desc)
        self.write("queue_driver", driver)
        self.write("queue_device", device)
        self.write("queue_enable", 1)


def enable_msix(t: VirtioPciDevice) -> None:
    cap = t.msix.cap_offset
    t.config.write(cap + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_ENABLE)
    for i in range(t.msix.nvectors):
        t.msix.table.write(16 * i, 4, 0xFEE0_0000)
        t.msix.table.write(16 * i + 8, 4, 0x40 + i)
        t.msix.table.write(16 * i + 12, 4, 0)


@pytest.fixture
def env():
    mem = GuestMemory.anonymous(4 * MB)
    ic = FakeInterruptController()
    dev = FakeDevice()
    t = VirtioPciDevice(dev, mem, ic)
    yield t, dev, Driver(t), ic.routes
    t.close()


def test_pci_identity():
    t = VirtioPciDevice(FakeDevice(), GuestMemory.anonymous(MB), FakeInterruptController())
    c = t.config
    assert c.read(PCI_VENDOR_ID, 4) == (0x1040 + 27) << 16 | 0x1AF4
    assert c.read(PCI_CLASS_REVISION, 4) == 0xFF00_0001
    assert c.read(PCI_SUBSYSTEM_VENDOR_ID, 4) == 0x0040_1AF4
    assert c.bars[0].mem64 and c.bars[0].size == VIRTIO_BAR_SIZE
    t.close()


def test_capabilities(env):
    t, *_ = env
    caps = {}
    pos = t.config.read(0x34, 1)
    while pos:
        cap_id = t.config.read(pos, 1)
        if cap_id == PCI_CAP_ID_VNDR:
            cfg_type, bar = t.config.read(pos + 3, 1), t.config.read(pos + 4, 1)
            caps[cfg_type] = (bar, t.config.read(pos + 8, 4), t.config.read(pos + 12, 4), pos)
            assert t.config.read(pos + 2, 1) == (20 if cfg_type in (2, 5) else 16)  # cap_len
        else:
            caps[("id", cap_id)] = pos
        pos = t.config.read(pos + 1, 1)
    assert caps[VIRTIO_PCI_CAP_COMMON_CFG][:3] == (0, COMMON_CFG_OFFSET, 0x3C)
    assert caps[VIRTIO_PCI_CAP_ISR_CFG][:3] == (0, ISR_CFG_OFFSET, 1)
    assert caps[VIRTIO_PCI_CAP_DEVICE_CFG][:3] == (0, DEVICE_CFG_OFFSET, 0x1000)
    assert caps[VIRTIO_PCI_CAP_NOTIFY_CFG][:3] == (0, NOTIFY_CFG_OFFSET, 4)
    assert t.config.read(caps[VIRTIO_PCI_CAP_NOTIFY_CFG][3] + 16, 4) == 4  # notify_off_multiplier
    assert VIRTIO_PCI_CAP_PCI_CFG in caps
    msix = caps[("id", PCI_CAP_ID_MSIX)]
    assert t.config.read(msix + PCI_MSIX_FLAGS, 2) == 1  # 2 vectors: queue 0 + config
    assert t.config.read(msix + PCI_MSIX_TABLE, 4) == MSIX_TABLE_OFFSET


def test_common_cfg_layout_is_the_spec_struct(env):
    t, *_ = env
    regs = t.common_cfg.registers.registers
    assert {r.name: (r.offset, r.size) for r in regs} == OFFS
    read_only = {"device_feature", "num_queues", "config_generation", "queue_notify_off", "queue_notify_data", "queue_reset"}
    assert {r.name for r in regs if r.write is None} == read_only


def test_common_cfg_status_machine_without_a_transport():
    """The status machine alone: DRIVER_OK calls back only after FEATURES_OK, 0 asks for reset."""
    calls: list[str] = []
    cc = VirtioPciCommonConfig(
        FakeDevice(), 2, on_driver_ok=lambda: calls.append("driver_ok"), on_reset=lambda: calls.append("reset"), name="t"
    )

    def write(name: str, value: int) -> None:
        cc.registers.write(*OFFS[name], value)

    write("device_status", VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK)
    assert calls == [] and not cc.status & VIRTIO_CONFIG_S_DRIVER_OK
    write("driver_feature_select", 1)
    write("driver_feature", VIRTIO_F_VERSION_1 >> 32)
    write("device_status", VIRTIO_CONFIG_S_FEATURES_OK)
    write("device_status", VIRTIO_CONFIG_S_DRIVER_OK)
    assert calls == ["driver_ok"] and cc.driver_ok
    write("queue_size", 16)  # frozen while DRIVER_OK
    assert cc.registers.read(*OFFS["queue_size"]) == 256
    write("config_msix_vector", 2)  # only vectors 0 and 1 exist
    assert cc.config_msix_vector == VIRTIO_MSI_NO_VECTOR
    write("device_status", 0)
    assert calls == ["driver_ok", "reset"]


def test_feature_negotiation_with_high_bits(env):
    t, _dev, d, _ = env
    assert d.read("num_queues") == 1
    d.write("device_feature_select", 0)
    assert d.read("device_feature") == F_DEV_LOW
    d.write("device_feature_select", 1)
    assert d.read("device_feature") == (VIRTIO_F_VERSION_1 | F_DEV_HIGH) >> 32
    d.write("device_feature_select", 2)
    assert d.read("device_feature") == 0
    d.write("device_feature", 0xFFFF_FFFF)  # read-only
    status = d.negotiate(VIRTIO_F_VERSION_1 | F_DEV_HIGH)
    assert status & VIRTIO_CONFIG_S_FEATURES_OK
    assert t.driver_features == VIRTIO_F_VERSION_1 | F_DEV_HIGH
    d.write("driver_feature_select", 1)
    assert d.read("driver_feature") == (VIRTIO_F_VERSION_1 | F_DEV_HIGH) >> 32
    d.write("driver_feature", 0)  # after FEATURES_OK: ignored
    assert t.driver_features == VIRTIO_F_VERSION_1 | F_DEV_HIGH
    d.write("driver_feature_select", 7)
    assert d.read("driver_feature") == 0


@pytest.mark.parametrize("features", [F_DEV_LOW, VIRTIO_F_VERSION_1 | 1 << 5, VIRTIO_F_VERSION_1 | 1 << 40])
def test_features_ok_rejected(env, features):
    _t, _, d, _ = env
    status = d.negotiate(features)
    assert status == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
    d.write("device_status", status | VIRTIO_CONFIG_S_DRIVER_OK)  # DRIVER_OK needs FEATURES_OK
    assert not d.read("device_status") & VIRTIO_CONFIG_S_DRIVER_OK


def test_status_bits_only_added(env):
    _, _, d, _ = env
    d.write("device_status", VIRTIO_CONFIG_S_ACKNOWLEDGE)
    d.write("device_status", VIRTIO_CONFIG_S_DRIVER)
    assert d.read("device_status") == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
    d.write("device_status", VIRTIO_CONFIG_S_NEEDS_RESET)  # device-owned bit
    assert d.read("device_status") == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
    d.write("device_status", VIRTIO_CONFIG_S_FAILED)
    assert d.read("device_status") & VIRTIO_CONFIG_S_FAILED


def test_queue_registers_and_validation(env):
    t, _, d, _ = env
    assert d.read("queue_size") == 256
    assert d.read("queue_msix_vector") == VIRTIO_MSI_NO_VECTOR
    assert d.read("queue_notify_off") == 0
    d.write("queue_msix_vector", 1)
    assert d.read("queue_msix_vector") == 1
    d.write("queue_msix_vector", 2)  # table has 2 entries: 0 and 1
    assert d.read("queue_msix_vector") == VIRTIO_MSI_NO_VECTOR
    d.write("config_msix_vector", 0)
    assert d.read("config_msix_vector") == 0
    d.write("config_msix_vector", 0x1234)
    assert d.read("config_msix_vector") == VIRTIO_MSI_NO_VECTOR
    d.write("queue_desc", 0x1_2345_6780)
    assert d.read("queue_desc") == 0x1_2345_6780
    d.write("queue_enable", 0)
    assert d.read("queue_enable") == 0
    d.write("queue_select", 1)  # out of range
    assert d.read("queue_select") == 1
    assert [d.read(n) for n in ("queue_size", "queue_enable", "queue_desc", "queue_notify_off")] == [0, 0, 0, 0]
    d.write("queue_size", 16)
    d.write("queue_enable", 1)
    d.write("queue_select", 0)
    assert d.read("queue_size") == 256 and d.read("queue_enable") == 0
    assert d.read("queue_notify_data") == 0 and d.read("queue_reset") == 0
    # 1.2 layout: the structure is 0x3c bytes; beyond reads 0
    assert t.router.read(0x3C, 4) == 0


def activate(t, d, size=16, desc=0x1000, driver=0x2000, device=0x3000):
    enable_msix(t)
    d.negotiate(VIRTIO_F_VERSION_1)
    d.write("config_msix_vector", 0)
    d.setup_queue(0, size, desc, driver, device, vector=1)
    d.write("device_status", d.read("device_status") | VIRTIO_CONFIG_S_DRIVER_OK)


def test_driver_ok_activates(env):
    t, dev, d, routes = env
    activate(t, d)
    assert d.read("device_status") & VIRTIO_CONFIG_S_DRIVER_OK
    ((mem, queues, fds, signal_used, needs_reset),) = dev.activated
    assert mem is t.mem
    (q,) = queues
    assert isinstance(q, Virtqueue)
    assert (q.size, q.desc_table, q.avail_ring, q.used_ring) == (16, 0x1000, 0x2000, 0x3000)
    assert [e.offset for e in t.ioeventfds()] == [NOTIFY_CFG_OFFSET]
    assert t.ioeventfds()[0].fd == fds[0] and t.ioeventfds()[0].length == 2
    # queue registers are frozen while live
    d.write("queue_size", 32)
    assert d.read("queue_size") == 16
    # a notify write reaching Python signals the queue's eventfd
    t.router.write(NOTIFY_CFG_OFFSET, 2, 0)
    assert os.eventfd_read(fds[0]) == 1
    t.router.write(NOTIFY_CFG_OFFSET + 4, 2, 1)  # no such queue: ignored
    # used-buffer interrupt: ISR bit 0 and the queue's vector
    signal_used(0)
    assert routes[1].delivered == [(0xFEE0_0000, 0x41)]
    assert t.router.read(ISR_CFG_OFFSET, 1) == 1
    assert t.router.read(ISR_CFG_OFFSET, 1) == 0  # read-to-clear
    signal_used(5)  # out of range: ignored
    # device error: NEEDS_RESET, ISR bit 1, config vector
    needs_reset()
    assert d.read("device_status") & VIRTIO_CONFIG_S_NEEDS_RESET
    assert t.router.read(ISR_CFG_OFFSET, 1) == 2
    assert routes[0].delivered == [(0xFEE0_0000, 0x40)]


def test_no_vector_means_isr_only(env):
    t, dev, d, routes = env
    activate(t, d)
    d.write("queue_select", 0)
    t.common_cfg.queue_registers[0].msix_vector = VIRTIO_MSI_NO_VECTOR  # as if the driver never assigned one
    dev.activated[0][3](0)
    assert routes[1].delivered == []
    assert t.router.read(ISR_CFG_OFFSET, 1) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"desc": 0x1008},  # descriptor table not 16-byte aligned
        {"device": 0x10_0000_0000},  # used ring outside guest memory
        {"size": 24},  # not a power of 2
        {"size": 512},  # larger than the maximum
        {"size": 0},
    ],
)
def test_bad_queue_needs_reset(env, kwargs):
    t, dev, d, routes = env
    activate(t, d, **kwargs)
    assert dev.activated == []
    assert d.read("device_status") & VIRTIO_CONFIG_S_NEEDS_RESET
    assert routes[0].delivered == [(0xFEE0_0000, 0x40)]  # config vector
    assert t.router.read(ISR_CFG_OFFSET, 1) == 2
    assert t.ioeventfds() == ()


def test_reset_and_reactivate(env):
    t, dev, d, _routes = env
    bridge_reg = FakeIoEventRegistry()
    bridge = PciHostBridge(Bus("mmio"), bridge_reg, AddressAllocator("w32", AddressRange(0xC000_0000, 0x1000_0000)))
    bridge.add_device(t)
    activate(t, d)
    fd = dev.activated[0][2][0]
    assert {e[2] for e in bridge_reg.active} == {fd}
    d.write("device_status", 0)
    assert dev.resets == 1
    assert bridge_reg.active == set()  # ioeventfd detached ...
    with pytest.raises(OSError):
        os.fstat(fd)  # ... and closed
    assert d.read("device_status") == 0
    assert t.driver_features == 0
    assert d.read("config_msix_vector") == VIRTIO_MSI_NO_VECTOR
    assert [d.read(n) for n in ("queue_select", "queue_size", "queue_enable", "queue_desc", "queue_msix_vector")] == [
        0,
        256,
        0,
        0,
        VIRTIO_MSI_NO_VECTOR,
    ]
    assert t.router.read(ISR_CFG_OFFSET, 1) == 0
    # the MSI-X table (PCI state) survives a virtio reset
    assert t.msix.table.read(8, 4) == 0x40
    activate(t, d, size=8)
    assert len(dev.activated) == 2 and dev.activated[1][1][0].size == 8
    assert len(bridge_reg.active) == 1


def test_reset_after_needs_reset_clears_it(env):
    t, dev, d, _ = env
    activate(t, d, desc=0x1001)
    assert d.read("device_status") & VIRTIO_CONFIG_S_NEEDS_RESET
    d.write("device_status", 0)
    assert d.read("device_status") == 0
    activate(t, d)
    assert len(dev.activated) == 1


def test_two_queues_and_gaps():
    mem = GuestMemory.anonymous(MB)
    dev = FakeDevice(queue_max_sizes=(64, 64))
    t = VirtioPciDevice(dev, mem, FakeInterruptController())
    d = Driver(t)
    enable_msix(t)
    d.negotiate(VIRTIO_F_VERSION_1)
    d.setup_queue(1, 8, 0x1000, 0x2000, 0x3000, vector=2)
    d.write("queue_select", 1)
    assert d.read("queue_notify_off") == 1
    d.write("device_status", d.read("device_status") | VIRTIO_CONFIG_S_DRIVER_OK)
    assert dev.activated == []  # queue 0 disabled below an enabled queue 1
    assert d.read("device_status") & VIRTIO_CONFIG_S_NEEDS_RESET
    d.write("device_status", 0)
    d.negotiate(VIRTIO_F_VERSION_1)
    d.setup_queue(0, 8, 0x1000, 0x2000, 0x3000, vector=1)
    d.setup_queue(1, 8, 0x4000, 0x5000, 0x6000, vector=2)
    d.write("device_status", d.read("device_status") | VIRTIO_CONFIG_S_DRIVER_OK)
    ((_, queues, _fds, _, _),) = dev.activated
    assert [q.desc_table for q in queues] == [0x1000, 0x4000]
    assert [e.offset for e in t.ioeventfds()] == [NOTIFY_CFG_OFFSET, NOTIFY_CFG_OFFSET + 4]
    t.close()


def test_device_config_forwarded(env):
    t, _, _, _ = env
    assert t.router.read(DEVICE_CFG_OFFSET, 4) == 0x4000_0000
    assert t.router.read(DEVICE_CFG_OFFSET + 4, 4) == 1
    assert t.router.read(DEVICE_CFG_OFFSET + 8, 8) == 0x4000_0000
    assert t.router.read(DEVICE_CFG_OFFSET + 0x100, 4) == 0


def test_pci_cfg_access_window(env):
    t, _, d, _ = env
    cap = next(c.offset for c in t.config.capabilities if t.config.read(c.offset + 3, 1) == VIRTIO_PCI_CAP_PCI_CFG)
    t.config.write(cap + 4, 1, 0)  # bar
    t.config.write(cap + 8, 4, COMMON_CFG_OFFSET + OFFS["num_queues"][0])
    t.config.write(cap + 12, 4, 2)
    assert t.config.read(cap + 16, 2) == 1
    t.config.write(cap + 8, 4, COMMON_CFG_OFFSET + OFFS["device_status"][0])
    t.config.write(cap + 12, 4, 1)
    t.config.write(cap + 16, 4, VIRTIO_CONFIG_S_ACKNOWLEDGE)
    assert d.read("device_status") == VIRTIO_CONFIG_S_ACKNOWLEDGE
    t.config.write(cap + 4, 1, 3)  # no such BAR: reads 0, writes dropped
    assert t.config.read(cap + 16, 4) == 0


def test_linux_probe_sequence():
    """pci scan + virtio_pci_modern probe + virtio_dev_probe + vp_find_vqs_msix, all via conf1
    and the MMIO bus, against a real host bridge."""
    mmio, pio = Bus("mmio"), Bus("pio")
    ioev = FakeIoEventRegistry()
    w32, w64 = AddressRange(0xC000_0000, 0x3EC0_0000), AddressRange(1 << 32, 1 << 32)
    bridge = PciHostBridge(mmio, ioev, AddressAllocator("w32", w32), AddressAllocator("w64", w64))
    pio.register(layout.PCI_CONFIG_ADDRESS_PORT, layout.PCI_CONFIG_PORT_COUNT, bridge.conf1, "pci-conf1")
    mem = GuestMemory.anonymous(4 * MB)
    ic = FakeInterruptController()
    dev = FakeDevice()
    bridge.add_device(VirtioPciDevice(dev, mem, ic))
    g = GuestConf1(pio)

    # pci_scan_slot: find the virtio function
    slots = [s for s in range(32) if g.read(s, PCI_VENDOR_ID, 2) == 0x1AF4]
    assert len(slots) == 1
    slot = slots[0]
    assert g.read(slot, 0x02, 2) == 0x1040 + 27
    # __pci_read_base on BAR 0
    addr, size, flags = g.size_bar(slot, 0)
    assert size == VIRTIO_BAR_SIZE and flags & 0x4 and addr >= 1 << 32
    # virtio_pci_find_capability for each cfg_type
    caps = {}
    for pos, cap_id in g.capabilities(slot):
        if cap_id == PCI_CAP_ID_VNDR:
            cfg_type = g.read(slot, pos + 3, 1)
            caps.setdefault(cfg_type, (g.read(slot, pos + 4, 1), g.read(slot, pos + 8, 4), g.read(slot, pos + 12, 4), pos))
        elif cap_id == PCI_CAP_ID_MSIX:
            msix_cap = pos
    bar, common, clen, _ = caps[VIRTIO_PCI_CAP_COMMON_CFG]
    assert bar == 0 and clen >= 56
    _, notify, _, npos = caps[VIRTIO_PCI_CAP_NOTIFY_CFG]
    mult = g.read(slot, npos + 16, 4)
    _, isr, _, _ = caps[VIRTIO_PCI_CAP_ISR_CFG]
    _, devcfg, _, _ = caps[VIRTIO_PCI_CAP_DEVICE_CFG]
    # pci_enable_device + pci_set_master
    g.write(slot, PCI_COMMAND, 2, g.read(slot, PCI_COMMAND, 2) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    def cr(name):
        off, size = OFFS[name]
        return mmio.read(addr + common + off, size)[0]

    def cw(name, value):
        off, size = OFFS[name]
        if size == 8:
            mmio.write(addr + common + off, 4, value & 0xFFFF_FFFF)
            mmio.write(addr + common + off + 4, 4, value >> 32)
        else:
            mmio.write(addr + common + off, size, value)

    # virtio_dev_probe: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK
    cw("device_status", 0)
    assert cr("device_status") == 0
    cw("device_status", VIRTIO_CONFIG_S_ACKNOWLEDGE)
    cw("device_status", VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    cw("device_feature_select", 0)
    features = cr("device_feature")
    cw("device_feature_select", 1)
    features |= cr("device_feature") << 32
    assert features & VIRTIO_F_VERSION_1
    wanted = features & (VIRTIO_F_VERSION_1 | F_DEV_LOW)
    cw("driver_feature_select", 0)
    cw("driver_feature", wanted & 0xFFFF_FFFF)
    cw("driver_feature_select", 1)
    cw("driver_feature", wanted >> 32)
    cw("device_status", cr("device_status") | VIRTIO_CONFIG_S_FEATURES_OK)
    assert cr("device_status") & VIRTIO_CONFIG_S_FEATURES_OK
    # virtio_pmem reads start/size from device config
    assert mmio.read(addr + devcfg, 4)[0] | mmio.read(addr + devcfg + 4, 4)[0] << 32 == 0x1_4000_0000

    # msix_capability_init: enable + maskall, mask entries, program, clear maskall
    g.write(slot, msix_cap + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
    nvec = (g.read(slot, msix_cap + PCI_MSIX_FLAGS, 2) & 0x7FF) + 1
    table = addr + (g.read(slot, msix_cap + PCI_MSIX_TABLE, 4) & ~7)
    for i in range(nvec):
        mmio.write(table + 16 * i + 12, 4, 1)
        mmio.write(table + 16 * i, 4, 0xFEE0_0000)
        mmio.write(table + 16 * i + 4, 4, 0)
        mmio.write(table + 16 * i + 8, 4, 0x30 + i)
    g.write(slot, msix_cap + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_ENABLE)
    for i in range(nvec):  # request_irq -> unmask
        mmio.write(table + 16 * i + 12, 4, 0)
        mmio.read(table + 16 * i + 12, 4)

    # vp_modern_find_vqs / setup_vq for queue 0
    cw("config_msix_vector", 0)
    assert cr("config_msix_vector") == 0
    cw("queue_select", 0)
    qmax = cr("queue_size")
    assert qmax == 256
    cw("queue_size", 64)
    cw("queue_msix_vector", 1)
    assert cr("queue_msix_vector") == 1
    cw("queue_desc", 0x10000)
    cw("queue_driver", 0x11000)
    cw("queue_device", 0x12000)
    notify_addr = addr + notify + cr("queue_notify_off") * mult
    cw("queue_enable", 1)
    # virtio_device_ready
    cw("device_status", cr("device_status") | VIRTIO_CONFIG_S_DRIVER_OK)
    assert cr("device_status") & VIRTIO_CONFIG_S_DRIVER_OK

    ((_, queues, fds, signal_used, _),) = dev.activated
    assert (queues[0].size, queues[0].desc_table) == (64, 0x10000)
    assert (notify_addr, 2, fds[0], None) in ioev.active  # KVM would catch the kick
    mmio.write(notify_addr, 2, 0)  # without KVM it reaches Python: same eventfd
    assert os.eventfd_read(fds[0]) == 1
    signal_used(0)
    assert ic.routes[1].delivered == [(0xFEE0_0000, 0x31)]
    assert mmio.read(addr + isr, 1)[0] == 1

    # driver removal: reset; the ioeventfd goes away with the queue
    cw("device_status", 0)
    assert dev.resets == 2 and ioev.active == set()  # the probe-time reset counted too


def test_reset_while_device_thread_signals():
    """device.reset() joins a worker that keeps calling signal_used/needs_reset: a vCPU
    resetting the device must not deadlock against it."""
    import threading

    class Worker(FakeDevice):
        def activate(self, mem, queues, notify_fds, signal_used, needs_reset) -> None:
            super().activate(mem, queues, notify_fds, signal_used, needs_reset)
            self.stop = threading.Event()

            def run() -> None:
                while not self.stop.is_set():
                    signal_used(0)

            self.thread = threading.Thread(target=run)
            self.thread.start()

        def begin_reset(self) -> None:
            super().begin_reset()
            if self.activated:
                self.stop.set()

        def reset_done(self) -> bool:
            return not (self.activated and self.thread.is_alive())

    mem = GuestMemory.anonymous(MB)
    dev = Worker()
    t = VirtioPciDevice(dev, mem, FakeInterruptController())
    d = Driver(t)
    activate(t, d)
    done = threading.Event()

    def vcpu() -> None:
        for _ in range(50):
            t.router.read(ISR_CFG_OFFSET, 1)
        d.write("device_status", 0)
        done.set()

    threading.Thread(target=vcpu).start()
    assert done.wait(5), "reset deadlocked against the device thread"
    deadline = time.monotonic() + 5
    while d.read("device_status") != 0:  # the driver polls until the device has stopped (2.4)
        assert time.monotonic() < deadline, "device_status never read 0"
        time.sleep(0.001)
    assert not dev.thread.is_alive()
    t.close()
