"""Decoding GDT entries, so tests check what the product wrote with an independent decoder."""

from __future__ import annotations

from minivmm.boot.entry import Segment


def decode_descriptor(selector: int, desc: int) -> Segment:
    """The `Segment` an 8-byte code/data or system-segment descriptor loads (Intel SDM vol. 3A,
    3.4.5: limit[15:0], base[23:0], access, limit[19:16], flags, base[31:24]); with G=1 the
    limit is in 4 KiB units, so the byte limit ends in 0xFFF."""
    limit = (desc & 0xFFFF) | (((desc >> 48) & 0xF) << 16)
    base = ((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24)
    access = (desc >> 40) & 0xFF
    flags = (desc >> 52) & 0xF
    g = (flags >> 3) & 1
    return Segment(
        selector=selector,
        base=base,
        limit=(limit << 12) | 0xFFF if g else limit,
        type=access & 0xF,
        present=access >> 7,
        dpl=(access >> 5) & 3,
        db=(flags >> 2) & 1,
        s=(access >> 4) & 1,
        l=(flags >> 1) & 1,
        g=g,
        avl=flags & 1,
    )
