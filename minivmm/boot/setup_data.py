"""setup_data: the linked list of extra boot data that boot_params.hdr.setup_data points at
(Documentation/arch/x86/boot.rst, "Details of Header Fields", setup_data; struct setup_data in
arch/x86/include/uapi/asm/bootparam.h), protocol 2.09 and later.

minivmm passes one entry on every boot through boot_params: SETUP_RNG_SEED with 32 bytes of
the host's getrandom(). The kernel's parse_setup_data() (arch/x86/kernel/setup.c) hands them
to add_bootloader_randomness(); with CONFIG_RANDOM_TRUST_BOOTLOADER they are credited and the
CRNG is ready before userspace, instead of hashing the input pool on every batch refill while
it is unseeded. The kernel memblock-reserves every entry before it allocates anything
(memblock_x86_reserve_range_setup_data) and zeroes the seed after use (forward secrecy).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from .. import layout
from ..memory import GuestMemory

SETUP_NONE = 0
SETUP_RNG_SEED = 9
RNG_SEED_SIZE = 32  # what QEMU passes; the kernel takes any length
SETUP_DATA_HEADER = struct.Struct("<QII")  # struct setup_data: next, type, len; data[] follows
SETUP_DATA_ALIGN = 8  # keep each entry's u64 `next` naturally aligned


@dataclass(frozen=True)
class SetupData:
    """One setup_data entry: SETUP_* type and payload."""

    type: int
    data: bytes


def rng_seed() -> SetupData:
    """A SETUP_RNG_SEED entry with fresh bytes from the host's getrandom()."""
    return SetupData(SETUP_RNG_SEED, os.urandom(RNG_SEED_SIZE))


def write_setup_data(mem: GuestMemory, entries: list[SetupData]) -> int:
    """Write `entries` as a chain in `layout.SETUP_DATA`; returns the address of the first
    (what boot_params.hdr.setup_data gets), 0 for none."""
    addrs, gpa = [], layout.SETUP_DATA.base
    for e in entries:
        addrs.append(gpa)
        gpa = layout.align_up(gpa + SETUP_DATA_HEADER.size + len(e.data), SETUP_DATA_ALIGN)
    assert gpa <= layout.SETUP_DATA.end, "setup_data entries overflow layout.SETUP_DATA"
    for i, (addr, e) in enumerate(zip(addrs, entries)):
        nxt = addrs[i + 1] if i + 1 < len(addrs) else 0
        mem.write(addr, SETUP_DATA_HEADER.pack(nxt, e.type, len(e.data)) + e.data)
    return addrs[0] if addrs else 0
