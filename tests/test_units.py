"""minivmm.units: byte sizes with K/M/G/T suffixes (powers of 1024)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minivmm.errors import UserError
from minivmm.units import format_size, parse_size


@pytest.mark.parametrize(
    "text, value",
    [
        ("0", 0),
        ("1024", 1024),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("256M", 256 << 20),
        ("4G", 4 << 30),
        ("1T", 1 << 40),
        ("256MiB", 256 << 20),
        ("4GB", 4 << 30),
        ("4gib", 4 << 30),
        ("512B", 512),
        (" 2M ", 2 << 20),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "-1", "+4G", "1.5G", "4 G", "4P", "4X", "1_000", "0x10", "4GG", "iB", "4iB", "G4"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UserError) as err:
        parse_size(text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value, text", [(0, "0"), (1, "1"), (4097, "4097"), (2 << 20, "2M"), (1536 << 20, "1536M"), (4 << 30, "4G"), (3 << 40, "3T")])
def test_format_size(value: int, text: str) -> None:
    assert format_size(value) == text


@given(st.integers(min_value=0, max_value=1 << 50))
def test_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n
