"""What ext4 DAX needs from the host side to map pmem with 2 MiB (PMD) faults (README "DAX
with 2 MiB pages"): every pmem device starts and ends on a 2 MiB guest physical boundary, and
the images minivmm's tools make ask ext4 for 2 MiB-aligned extents (stripe_width)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivmm import layout, pmemfile
from minivmm.allocator import ResourceAllocator
from minivmm.errors import UserError
from minivmm.layout import GiB, MiB

ROOT = Path(__file__).resolve().parent.parent
EXT4_BLOCK = 4096  # ext4 DAX needs the block size to be the page size


def _bench():
    spec = importlib.util.spec_from_file_location("minivmm_bench_dax", ROOT / "bench" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_pmem_alignment_constants_are_whole_pmds() -> None:
    assert layout.PMD_SIZE == 2 * MiB
    assert pmemfile.PMEM_SIZE_ALIGN == layout.PMD_SIZE
    assert layout.PMEM_ALIGN % layout.PMD_SIZE == 0


@given(
    mem=st.sampled_from([256 * MiB, 3 * GiB, 5 * GiB]),
    pieces=st.lists(st.integers(1, 300), min_size=1, max_size=6),
)
def test_every_pmem_device_starts_and_ends_on_a_pmd_boundary(mem: int, pieces: list[int]) -> None:
    """Sizes as `--pmem` accepts them (whole 2 MiB pages), placed the way Machine does."""
    res = ResourceAllocator(mem)
    for i, n in enumerate(pieces):
        window = res.pmem.allocate(n * layout.PMD_SIZE, layout.PMEM_ALIGN, f"pmem{i}")
        assert window.base % layout.PMD_SIZE == 0 and window.end % layout.PMD_SIZE == 0


@pytest.mark.parametrize("size", ["1M", "3M", "2052K", "4097M"])
def test_a_size_with_a_partial_2m_page_is_refused_not_rounded(size: str) -> None:
    with pytest.raises(UserError, match=r"is not a positive multiple of 2M$"):
        pmemfile.parse_pmem_option(f"disk.img,size={size}")


def _stripe_width(image: Path) -> int:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    found = re.search(r"^RAID stripe width:\s+(\d+)$", out, re.M)
    assert found, "mkfs did not record a stripe width"
    return int(found.group(1))


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None and not Path("/usr/sbin/mkfs.ext4").exists(), reason="needs e2fsprogs")
def test_bench_images_ask_ext4_for_2m_aligned_extents(tmp_path: Path) -> None:
    bench = _bench()
    image = tmp_path / "dax.img"
    image.write_bytes(b"")
    with open(image, "r+b") as f:
        f.truncate(64 * MiB)
    subprocess.run([bench.mkfs_ext4(), *bench.MKFS_EXT4_ARGS, str(image)], check=True, capture_output=True)
    assert _stripe_width(image) * EXT4_BLOCK == layout.PMD_SIZE


def test_make_run_image_uses_the_same_ext4_options() -> None:
    """The Makefile's PMEM_IMG line formats with the bench's options (block size, stripe)."""
    recipe = next(line for line in (ROOT / "Makefile").read_text().splitlines() if "mkfs.ext4" in line and "truncate" in line)
    args = _bench().MKFS_EXT4_ARGS
    assert " ".join(args[args.index("-b") :]) in recipe
    assert f"stripe_width={layout.PMD_SIZE // EXT4_BLOCK}" in recipe
