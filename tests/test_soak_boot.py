"""Crash safety on a real boot (issue 9, item 7), the short form of bench/soak_sigkill.py:
two rounds of the default guest writing an increasing counter to /dev/pmem0 with fsync,
each ended by SIGKILL of minivmm at a random moment after the first acknowledged value; the
backing file must then hold at least the last acknowledged value."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "soak_sigkill.py"
_spec = importlib.util.spec_from_file_location("minivmm_soak", _PATH)
soak_sigkill = importlib.util.module_from_spec(_spec)
sys.modules["minivmm_soak"] = soak_sigkill  # dataclasses look their module up
_spec.loader.exec_module(soak_sigkill)


@pytest.mark.boot
def test_sigkill_never_loses_an_acknowledged_value(guest, tmp_path) -> None:
    rounds = soak_sigkill.soak(2, max_delay=2.0, timeout=600, seed=9, workdir=tmp_path, kernel=guest.vmlinux, initrd=guest.initrd)
    report = "\n".join(soak_sigkill.describe_round(i + 1, 2, r) for i, r in enumerate(rounds))
    assert len(rounds) == 2, report
    for r in rounds:
        assert r.error is None and r.killed, report
        assert r.acks and r.file_value >= r.acks[-1], report  # nothing acknowledged was lost
        assert r.file_value <= r.acks[-1] + 1, report  # at most the one write in flight
    assert rounds[1].start_value == rounds[0].file_value  # the second boot went on from the file
