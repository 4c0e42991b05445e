"""Bus registration and dispatch rules (no KVM needed)."""

from __future__ import annotations

import pytest

from minivmm.bus import Bus, BusError
from tinyguest import PatternDevice, pattern_value


def test_overlapping_ranges_are_refused() -> None:
    bus = Bus("pio")
    bus.register(0x100, 0x10, PatternDevice(), "a")  # [0x100, 0x110)
    for base, size in ((0x100, 0x10), (0x10F, 1), (0xF0, 0x11), (0x108, 4), (0xF0, 0x100), (0x104, 0x100)):
        with pytest.raises(BusError, match="overlaps a"):
            bus.register(base, size, PatternDevice(), "b")
    assert [(r.base, r.size, r.name) for r in bus.ranges] == [(0x100, 0x10, "a")]


def test_overlap_with_a_neighbour_on_either_side_is_refused() -> None:
    bus = Bus("mmio")
    bus.register(0x1000, 0x100, PatternDevice(), "low")
    bus.register(0x3000, 0x100, PatternDevice(), "high")
    with pytest.raises(BusError, match="overlaps low"):
        bus.register(0x10FF, 0x10, PatternDevice(), "mid")
    with pytest.raises(BusError, match="overlaps high"):
        bus.register(0x2F00, 0x101, PatternDevice(), "mid")
    assert [r.name for r in bus.ranges] == ["low", "high"]


def test_bad_ranges_are_refused() -> None:
    bus = Bus("pio")
    for base, size in ((0x10, 0), (0x10, -1), (-1, 4)):
        with pytest.raises(BusError, match="bad range"):
            bus.register(base, size, PatternDevice())


def test_adjacent_ranges_are_fine_and_dispatch_to_their_own_device() -> None:
    bus = Bus("pio")
    left, mid, right = PatternDevice(), PatternDevice(), PatternDevice()
    bus.register(0x208, 8, right, "right")  # registered out of order on purpose
    bus.register(0x1F8, 8, left, "left")
    bus.register(0x200, 8, mid, "mid")
    assert [(r.base, r.name) for r in bus.ranges] == [(0x1F8, "left"), (0x200, "mid"), (0x208, "right")]
    assert bus.lookup(0x1FF).name == "left"
    assert bus.lookup(0x200).name == "mid"
    assert bus.lookup(0x207).name == "mid"
    assert bus.lookup(0x208).name == "right"
    assert bus.lookup(0x1F7) is None and bus.lookup(0x210) is None
    value, rng = bus.read(0x203, 2)
    assert (value, rng.name) == (pattern_value(3, 2), "mid")
    assert bus.write(0x20F, 1, 0x1AB).name == "right"  # value masked to the access size
    assert (mid.reads, right.writes, left.reads + left.writes) == ([(3, 2)], [(7, 1, 0xAB)], [])
    assert bus.hits == {"mid": 1, "right": 1}
    assert not bus.unclaimed


def test_an_access_straddling_a_range_end_is_unclaimed() -> None:
    bus = Bus("mmio")
    dev = PatternDevice()
    bus.register(0x1000, 8, dev, "dev")
    assert bus.read(0x1006, 4) == (0xFFFFFFFF, None)
    assert bus.write(0x1007, 2, 0x1234) is None
    assert bus.read(0xFFF, 2) == (0xFFFF, None)
    assert (dev.reads, dev.writes) == ([], [])
    assert bus.unclaimed == {"read": 2, "write": 1}


def test_unclaimed_reads_are_all_ones_and_writes_are_dropped_and_counted() -> None:
    bus = Bus("mmio")
    for size in (1, 2, 4, 8):
        assert bus.read(0xE000_0000, size) == ((1 << (8 * size)) - 1, None)
    assert bus.write(0xE000_0000, 4, 0) is None
    assert bus.unclaimed == {"read": 4, "write": 1}
    assert not bus.hits


def test_unregister_frees_the_range() -> None:
    bus = Bus("pio")
    first = bus.register(0x300, 4, PatternDevice(), "first")
    keep = bus.register(0x304, 4, PatternDevice(), "keep")
    bus.unregister(first)
    assert bus.ranges == (keep,)
    assert bus.read(0x300, 1) == (0xFF, None)  # now unclaimed
    assert bus.lookup(0x304) is keep
    again = PatternDevice()
    bus.register(0x300, 4, again, "again")  # the freed range can be claimed again
    assert bus.read(0x301, 1)[1].name == "again" and again.reads == [(1, 1)]
    with pytest.raises(ValueError):
        bus.unregister(first)  # not registered any more
