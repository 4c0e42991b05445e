"""Shared fixtures. Boot fixtures find the default guest built by `make guest`; a missing
guest is a test failure that says how to build it, never a skip."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def guest_kernel_dir() -> Path:
    """Directory holding the default guest's vmlinux and bzImage."""
    from minivmm import guestimage

    vmlinux = guestimage.default_kernel("vmlinux")
    if vmlinux is None:
        pytest.fail("default guest kernel not built: run `make guest`")
    return vmlinux.parent


@pytest.fixture(scope="session")
def guest():
    """The default guest as minivmm itself finds it (`guestimage.default_kernel/default_initrd`):
    ``guest.vmlinux``, ``guest.bzimage``, ``guest.initrd`` (Paths). Not built: a failure."""
    from types import SimpleNamespace

    from minivmm import guestimage

    paths = SimpleNamespace(
        vmlinux=guestimage.default_kernel("vmlinux"),
        bzimage=guestimage.default_kernel("bzImage"),
        initrd=guestimage.default_initrd(),
    )
    missing = [name for name, path in vars(paths).items() if path is None]
    if missing:
        pytest.fail(f"default guest not built ({', '.join(missing)} missing): run `make guest`")
    return paths
