"""One address-range type: a half-open interval [base, base + size) of guest-physical (or
port, or BAR-offset) addresses.

Everything that means "a plain range" uses `AddressRange`: where a loader put the kernel,
a PCI MMIO window, an allocation. The fixed entries of the memory map (`layout.NamedRange`)
are `AddressRange`s with a name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AddressRange:
    """[base, base + size); `size` may be 0 (an empty range at `base`)."""

    base: int
    size: int

    def __post_init__(self) -> None:
        if self.base < 0 or self.size < 0:
            raise ValueError(f"bad range {self.base:#x}+{self.size:#x}")

    @property
    def end(self) -> int:
        """The first address past the range."""
        return self.base + self.size

    def __contains__(self, addr: int) -> bool:
        return self.base <= addr < self.end

    def covers(self, base: int, size: int) -> bool:
        """Whether [base, base + size) lies wholly inside this range."""
        return self.base <= base and base + size <= self.end

    def overlaps(self, other: AddressRange) -> bool:
        return self.base < other.end and other.base < self.end

    def __str__(self) -> str:
        return f"{self.base:#x}-{self.end - 1:#x}" if self.size else f"{self.base:#x}+0"
