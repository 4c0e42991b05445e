"""Shared fixtures. Boot fixtures find the default guest built by `make guest`; a missing
guest is a test failure that says how to build it, never a skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minivmm"


def _newest(pattern: str) -> Path | None:
    found = sorted(cache_dir().glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


@pytest.fixture(scope="session")
def guest_kernel_dir() -> Path:
    """Directory holding the default guest's vmlinux and bzImage."""
    d = _newest("kernel-*/vmlinux")
    if d is None:
        pytest.fail("default guest kernel not built: run `make guest`")
    return d.parent
