"""docs/tutorial.md cannot rot: every example it quotes is run and its output compared.

The tutorial marks what it quotes from the examples:

* ``<!-- output of examples/NAME.py -->`` before a ```text block: the block is exactly what
  the script prints (stdout), checked by running the script as a reader does;
* ``<!-- excerpt of examples/NAME.py -->`` before a ```python block: the block appears
  verbatim in the script.

Steps 1-4 and 8 are tiny hand-built guests (seconds each, fast tests); steps 5-7 boot the default
Linux guest once each (marked `boot`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "docs" / "tutorial.md"
EXAMPLES = REPO / "examples"
BOOT_STEPS = ("05_", "06_", "07_")  # the Linux steps: each boots the default guest once
FAST_TIMEOUT_S = 60
BOOT_TIMEOUT_S = 1800  # the example's own runner stops a hung boot after 900 s

_QUOTE = re.compile(r"<!-- (output|excerpt) of (examples/[\w.]+) -->\n```(?:text|python)\n(.*?)```\n", re.DOTALL)


@dataclass(frozen=True)
class Quote:
    kind: str  # "output" or "excerpt"
    script: Path
    text: str


def quotes() -> list[Quote]:
    return [Quote(kind, REPO / path, text) for kind, path, text in _QUOTE.findall(TUTORIAL.read_text())]


def example_scripts() -> list[Path]:
    """The tutorial's steps: examples/NN_*.py."""
    return sorted(EXAMPLES.glob("[0-9][0-9]_*.py"))


def run_example(script: Path, timeout: float) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{script.name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_every_step_is_quoted_with_its_output() -> None:
    outputs = [q.script for q in quotes() if q.kind == "output"]
    assert sorted(outputs) == example_scripts(), "each examples/NN_*.py has exactly one quoted output"
    assert len(example_scripts()) == 8


def test_excerpts_are_the_examples_code() -> None:
    excerpts = [q for q in quotes() if q.kind == "excerpt"]
    assert excerpts
    for q in excerpts:
        assert q.text in q.script.read_text(), f"the tutorial's excerpt of {q.script.name} is not in it:\n{q.text}"


def _params() -> list:
    out = []
    for script in example_scripts():
        marks = [pytest.mark.boot] if script.name.startswith(BOOT_STEPS) else []
        out.append(pytest.param(script, id=script.stem, marks=marks))
    return out


@pytest.mark.parametrize("script", _params())
def test_example_prints_what_the_tutorial_quotes(script: Path) -> None:
    (quoted,) = [q.text for q in quotes() if q.kind == "output" and q.script == script]
    timeout = BOOT_TIMEOUT_S if script.name.startswith(BOOT_STEPS) else FAST_TIMEOUT_S
    assert run_example(script, timeout) == quoted


# -- the API the tutorial teaches: its documented errors -----------------------------------------
def test_bare_vm_rejects_what_its_docstrings_say() -> None:
    from minivmm.api import BareVm
    from minivmm.bus import BusError

    with BareVm(ram_size=32 << 10, irqchip=False) as vm:  # too small for the page tables
        with pytest.raises(ValueError, match="overlaps RAM"):
            vm.add_mmio_device(0x4000, 16, object(), "in-ram")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="outside 0..0xffff"):
            vm.add_port_device(0xFFFF, 2, object())  # type: ignore[arg-type]
        vm.add_port_device(0x80, 1, object(), "a")  # type: ignore[arg-type]
        with pytest.raises(BusError, match="overlaps"):
            vm.add_port_device(0x80, 1, object(), "b")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="16-byte aligned"):
            vm.start_real_mode(0x10008)
        with pytest.raises(ValueError, match="long mode needs"):
            vm.start_long_mode(0x1000)
        with pytest.raises(ValueError, match="irqchip"):
            vm.msi_route(0xFEE00000, 0x40)
    with pytest.raises(ValueError, match="multiple of 4 KiB"):
        BareVm(ram_size=1000)
    with pytest.raises(ValueError, match="needs irqchip"):
        BareVm(cpus=2, irqchip=False)
    with pytest.raises(ValueError, match="at least 1"):
        BareVm(cpus=0)


def test_bare_vm_closes_once_and_refuses_use_after_close() -> None:
    import os

    from minivmm.api import BareVm

    vm = BareVm(ram_size=1 << 20, cpus=2)
    vm.close()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(6)]  # reuse the numbers it freed
    try:
        vm.close()  # a second close must not close these
        assert all(os.fstat(fd) for fd in fds)
    finally:
        for fd in fds:
            os.close(fd)
    for use in (vm.run, vm.registers, vm.describe):
        with pytest.raises(ValueError, match="closed"):
            use()


def test_bare_vm_that_fails_to_build_leaks_no_descriptor() -> None:
    import os

    from minivmm.api import BareVm

    before = len(os.listdir("/proc/self/fd"))
    for bad in (5000, 2.5, True):
        with pytest.raises(ValueError, match="cpus="):
            BareVm(ram_size=1 << 20, cpus=bad)  # type: ignore[arg-type]
    assert len(os.listdir("/proc/self/fd")) == before


def test_bare_vm_off_the_main_thread_needs_the_kick_handler(monkeypatch) -> None:
    """A kick without its handler would kill the process: refused with a clear error instead."""
    import signal
    import threading

    from minivmm import api
    from minivmm.vcpu import KICK_SIGNAL

    previous = signal.signal(KICK_SIGNAL, signal.SIG_DFL)
    errors: list[BaseException] = []
    try:
        t = threading.Thread(target=lambda: _catch(errors, lambda: api.BareVm(ram_size=1 << 20)))
        t.start()
        t.join()
    finally:
        signal.signal(KICK_SIGNAL, previous)
    assert len(errors) == 1 and isinstance(errors[0], ValueError) and "main thread" in str(errors[0])


def _catch(errors: list[BaseException], fn) -> None:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        errors.append(exc)


def test_bare_vm_with_aps_times_out_with_every_vcpu_state() -> None:
    """APs never started stay in KVM_RUN's wait-for-SIPI; a timeout still ends every thread."""
    from minivmm.api import BareVm, RunTimeout

    with BareVm(ram_size=1 << 20, cpus=3) as vm:
        vm.load(0x10000, bytes.fromhex("eb fe"))  # the BSP spins and never sends a SIPI
        vm.start_real_mode(0x10000)
        with pytest.raises(RunTimeout, match=r"(?s)vCPU 0:.*vCPU 1:.*vCPU 2:"):
            vm.run(timeout=0.2)
        assert all(loop.thread is not None and not loop.thread.is_alive() for loop in vm.loops)


def test_bare_vm_run_times_out_with_the_vcpu_state_and_runs_once() -> None:
    from minivmm.api import BareVm, RunTimeout

    with BareVm(ram_size=1 << 20, irqchip=False) as vm:
        vm.load(0x10000, bytes.fromhex("eb fe"))  # jmp $: never stops
        vm.start_real_mode(0x10000)
        with pytest.raises(RunTimeout, match=r"did not stop within 0.2 s(.|\n)*rip"):
            vm.run(timeout=0.2)
        assert vm.stats.by_kind["intr"] >= 1  # the kick that ended KVM_RUN
        with pytest.raises(ValueError, match="runs once"):
            vm.run()
