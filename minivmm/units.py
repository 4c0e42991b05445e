"""Byte sizes on the command line: ``1024``, ``64K``, ``256M``, ``4G``, ``1T`` (powers of 1024).

A suffix may be followed by ``B`` or ``iB`` (``256MiB``, ``4GB`` mean the same as ``256M``,
``4G``); a bare ``B`` means bytes. Suffixes are case-insensitive. Only whole numbers of bytes
are accepted: no fractions, signs, spaces inside the number or underscores.
"""

from __future__ import annotations

import re

from .errors import UserError

_MULTIPLIERS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"([0-9]+)([KMGT]?)(I?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """The byte count `text` names, or UserError with a one-line message."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None or (m.group(3) and m.group(3).upper() == "IB" and not m.group(2)):
        raise UserError(f"bad size {text!r}: expected a number of bytes with an optional K, M, G or T suffix")
    return int(m.group(1)) * _MULTIPLIERS[m.group(2).upper()]


def format_size(n: int) -> str:
    """The shortest exact spelling of `n` bytes: 4G, 1536M, 4097 (inverse of parse_size)."""
    if n < 0:
        raise ValueError(f"negative size {n}")
    for suffix in ("T", "G", "M", "K"):
        unit = _MULTIPLIERS[suffix]
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)
