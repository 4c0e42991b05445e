"""SMP (`--cpus N`) on real KVM with tiny synthetic kernels, in milliseconds each.

- `--cpus` bounds: a one-line error and status 2 outside 1..MAX_VCPUS;
- per-vCPU set-up read back from the real KVM vCPUs of an assembled machine: CPUID (APIC id
  and one package of one core of one thread per vCPU), MSR_IA32_APICBASE (BSP bit on vCPU 0
  only), the local APIC ID register, the multiprocessing state (vCPU 0 runnable, the others
  in wait-for-SIPI), the entry registers on vCPU 0 only;
- the guest's own INIT-SIPI-SIPI through the in-kernel local APIC: the bootstrap processor
  (32-bit protected mode, PVH entry) writes a real-mode trampoline below 1 MiB and sends
  INIT and two start-up IPIs to APIC id 1; the application processor starts at the SIPI
  vector, prints on COM1 and powers the machine off (ACPI S5) while the bootstrap processor
  spins: a stop from an application processor ends the run and kicks the others; `--trace`
  names the vCPU of each exit, `--stats`/`--stats-json` count each vCPU's own exits;
- SIGUSR1 dumps every vCPU, and pause/resume stops and restarts every vCPU thread.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from minivmm import hostcheck, kvm, layout, vcpu_setup
from minivmm.boot.acpi import S5_SLP_TYP
from minivmm.devices.acpi_pm import SLP_EN, SLP_TYP_SHIFT
from minivmm.errors import UserError
from minivmm.exit_handler import Stop
from minivmm.boot import BootProtocol
from minivmm.machine import Machine, MachineConfig
from minivmm.pmemfile import PmemSpec
from minivmm.vcpu import install_kick_handler
from support.idle import wait_until
from support.synthetic_kernels import make_pvh_elf, smoke_pvh_elf

MiB = 1 << 20
TRAMPOLINE = 0x30000  # a free page below 1 MiB: start-up vector 0x30 (SDM vol. 3, 8.4.4.1)
ENTRY = 0x1000000  # make_pvh_elf's load address and entry point
SPIN = b"\xeb\xfe"  # jmp $
HLT_LOOP = b"\xf4\xeb\xfd"  # hlt; jmp hlt

# Local APIC registers (xAPIC MMIO, SDM vol. 3 table 10-1) and ICR encodings (10.6.1)
APIC_SVR = 0xF0
APIC_ICR_LOW = 0x300
APIC_ICR_HIGH = 0x310
APIC_ID = 0x20
APIC_SOFTWARE_ENABLE = 0x100
ICR_INIT_ASSERT = 0x4500  # delivery mode INIT (101b), level assert
ICR_STARTUP = 0x4600  # delivery mode start-up (110b), level assert; | vector


def real_mode_print(message: bytes) -> bytes:
    """16-bit code: mov dx, COM1; then mov al, ch; out dx, al for each byte."""
    code = b"\xba" + struct.pack("<H", layout.COM1_PORT)
    return code + b"".join(bytes([0xB0, ch, 0xEE]) for ch in message)


def real_mode_poweroff() -> bytes:
    """16-bit code: write SLP_TYP(S5) | SLP_EN to the ACPI sleep control port."""
    return b"\xba" + struct.pack("<H", layout.ACPI_SLEEP_CONTROL_PORT) + bytes([0xB0, (S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN, 0xEE])


def mov_dword(addr: int, value: int) -> bytes:
    """32-bit code: mov dword [addr], value (C7 /0 with a disp32 operand)."""
    return b"\xc7\x05" + struct.pack("<II", addr, value)


def sipi_kernel(ap_code: bytes, bsp_tail: bytes = SPIN, target: int = 1) -> bytes:
    """A PVH kernel whose bootstrap processor copies `ap_code` (real mode) to TRAMPOLINE,
    enables its local APIC and sends INIT, SIPI, SIPI to APIC id `target` (the MP start-up
    sequence, SDM vol. 3 8.4.4.1), then runs `bsp_tail`."""
    ap_code += b"\x90" * (-len(ap_code) % 4)
    lapic = layout.LAPIC.base
    code = b"".join(mov_dword(TRAMPOLINE + i, struct.unpack_from("<I", ap_code, i)[0]) for i in range(0, len(ap_code), 4))
    code += mov_dword(lapic + APIC_SVR, APIC_SOFTWARE_ENABLE | 0xFF)
    for icr in (ICR_INIT_ASSERT, ICR_STARTUP | TRAMPOLINE >> 12, ICR_STARTUP | TRAMPOLINE >> 12):
        code += mov_dword(lapic + APIC_ICR_HIGH, target << 24) + mov_dword(lapic + APIC_ICR_LOW, icr)
    return make_pvh_elf(code + bsp_tail)


@pytest.fixture
def null_fd():
    fd = os.open(os.devnull, os.O_RDWR)
    yield fd
    os.close(fd)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def run(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`minivmm run` a PVH kernel (this file's kernels start in 32-bit code)."""
    return subprocess.run([sys.executable, "-m", "minivmm", "run", "--boot", "pvh", *map(str, args)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


# -- --cpus bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "9", "-1", "two", "100"])
def test_cpus_outside_1_to_8_is_a_one_line_error(tmp_path: Path, value: str) -> None:
    p = run("--kernel", write(tmp_path, "k", smoke_pvh_elf()), "--cpus", value)
    assert p.returncode == 2
    assert p.stderr == f"minivmm run: error: argument --cpus: {value!r} is not a number of vCPUs from 1 to {layout.MAX_VCPUS}\n"
    assert p.stdout == ""


@pytest.mark.parametrize("cpus", [0, layout.MAX_VCPUS + 1])
def test_machine_refuses_cpus_outside_the_bounds(tmp_path: Path, cpus: int) -> None:
    """Before any pmem file is created (a user error changes nothing on disk)."""
    new = tmp_path / "new.img"
    with pytest.raises(UserError, match=f"{cpus} vCPUs: a machine has 1 to {layout.MAX_VCPUS}"):
        Machine(MachineConfig(boot=BootProtocol.PVH, kernel=tmp_path / "unused", mem_size=64 * MiB, cpus=cpus, pmem=[PmemSpec(str(new), size=2 * MiB)]))
    assert not new.exists()


# -- per-vCPU set-up, read back from KVM ------------------------------------------------------


def leaf(entries: list[dict[str, int]], function: int, index: int = 0) -> dict[str, int] | None:
    return next((e for e in entries if e["function"] == function and e["index"] == index), None)


@pytest.mark.parametrize("index", range(layout.MAX_VCPUS))
def test_cpuid_gives_each_vcpu_its_apic_id_in_a_package_of_its_own(index: int) -> None:
    supported = kvm.Kvm().supported_cpuid()
    entries = vcpu_setup.vcpu_cpuid(supported, index)
    f1 = leaf(entries, 1)
    assert f1 is not None
    assert f1["ebx"] >> 24 == index  # initial APIC id
    assert (f1["ebx"] >> 16) & 0xFF == 1 and not f1["edx"] & vcpu_setup.CPUID_HTT_BIT  # one logical processor per package
    assert f1["ecx"] & vcpu_setup.CPUID_HYPERVISOR_BIT
    assert (f1["eax"], f1["ebx"] & 0xFFFF) == (leaf(supported, 1)["eax"], leaf(supported, 1)["ebx"] & 0xFFFF)
    for fn in (vcpu_setup.CPUID_LEAF_EXT_TOPOLOGY, vcpu_setup.CPUID_LEAF_V2_EXT_TOPOLOGY):
        if leaf(supported, fn) is None:
            assert leaf(entries, fn) is None
            continue
        subleaves = [(e["index"], e["eax"], e["ebx"], e["ecx"], e["edx"]) for e in entries if e["function"] == fn]
        # SMT level: 1 thread, shift 0; core level: 1 core, shift 0 (package id = APIC id); then the end
        assert subleaves == [(0, 0, 1, 0x100, index), (1, 0, 1, 0x201, index), (2, 0, 0, 2, index)]
    for e in entries:
        if e["function"] == vcpu_setup.CPUID_LEAF_CACHE_PARAMS:
            assert e["eax"] >> 14 == 0  # no cache shared with another logical processor, one core
        if e["function"] == vcpu_setup.CPUID_LEAF_AMD_CACHE_TOPOLOGY:
            assert (e["eax"] >> 14) & 0xFFF == 0
    if (size_ids := leaf(entries, vcpu_setup.CPUID_LEAF_AMD_SIZE_IDS)) is not None:
        assert size_ids["ecx"] & 0xF0FF == 0  # NC = 0 (one core), ApicIdCoreIdSize = 0
    if (ext := leaf(entries, vcpu_setup.CPUID_LEAF_EXT_FEATURES)) is not None:
        assert not ext["ecx"] & vcpu_setup.CPUID_CMP_LEGACY_BIT
    if (ext_apic := leaf(entries, vcpu_setup.CPUID_LEAF_AMD_EXT_APIC_ID)) is not None:
        assert (ext_apic["eax"], ext_apic["ebx"], ext_apic["ecx"]) == (index, 0, 0)
    sig = leaf(entries, vcpu_setup.KVM_CPUID_SIGNATURE)
    assert sig is not None and struct.pack("<3I", sig["ebx"], sig["ecx"], sig["edx"]) == vcpu_setup.KVM_SIGNATURE


def table(entries: list[dict[str, int]]) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    return {(e["function"], e["index"]): (e["eax"], e["ebx"], e["ecx"], e["edx"]) for e in entries}


def topology(entries: list[dict[str, int]]) -> dict[tuple[int, int], tuple[int, ...]]:
    """The registers and fields `vcpu_cpuid` sets for the APIC id and the topology."""
    view: dict[tuple[int, int], tuple[int, ...]] = {}
    for (fn, sub), (eax, ebx, ecx, edx) in table(entries).items():
        if fn == vcpu_setup.CPUID_LEAF_FEATURES:
            view[fn, sub] = (ebx,)
        elif fn in (vcpu_setup.CPUID_LEAF_EXT_TOPOLOGY, vcpu_setup.CPUID_LEAF_V2_EXT_TOPOLOGY, vcpu_setup.CPUID_LEAF_AMD_EXT_APIC_ID):
            view[fn, sub] = (eax, ebx, ecx, edx)
        elif fn in (vcpu_setup.CPUID_LEAF_CACHE_PARAMS, vcpu_setup.CPUID_LEAF_AMD_CACHE_TOPOLOGY):
            view[fn, sub] = (eax >> 14,)
        elif fn == vcpu_setup.CPUID_LEAF_AMD_SIZE_IDS:
            view[fn, sub] = (ecx & 0xF0FF,)
        elif fn == vcpu_setup.KVM_CPUID_SIGNATURE:
            view[fn, sub] = (ebx, ecx, edx)
    return view


def test_hidden_kvm_features_are_cleared_from_leaf_0x40000001_only() -> None:
    supported = kvm.Kvm().supported_cpuid()
    mask = hostcheck.SOFTWARE_KVM_HIDDEN_KVM_FEATURES
    plain, hidden = table(vcpu_setup.vcpu_cpuid(supported, 1)), table(vcpu_setup.vcpu_cpuid(supported, 1, mask))
    key = (vcpu_setup.KVM_CPUID_FEATURES, 0)
    assert hidden[key][0] == plain[key][0] & ~mask and hidden[key][1:] == plain[key][1:]
    assert {k: v for k, v in hidden.items() if k != key} == {k: v for k, v in plain.items() if k != key}


def test_only_a_software_kvm_gets_the_smp_remedies(tmp_path: Path) -> None:
    """The remedies are no-ops on hardware KVM: nothing hidden without kvm_pvm."""
    hardware = hostcheck.probe(tmp_path)  # an empty /sys/module
    assert hardware.hidden_kvm_features == 0
    (tmp_path / "kvm_pvm").mkdir()
    software = hostcheck.probe(tmp_path)
    assert software.hidden_kvm_features == hostcheck.SOFTWARE_KVM_HIDDEN_KVM_FEATURES
    mask = hostcheck.SOFTWARE_KVM_HIDDEN_KVM_FEATURES
    names = ("KVM_FEATURE_PV_UNHALT", "KVM_FEATURE_PV_TLB_FLUSH", "KVM_FEATURE_PV_SEND_IPI", "KVM_FEATURE_PV_SCHED_YIELD")
    assert mask == (1 << 7) | (1 << 9) | (1 << 11) | (1 << 13) == sum(getattr(hostcheck, n) for n in names)


@pytest.fixture
def booted_4(tmp_path: Path):
    """A 4-vCPU machine with a kernel loaded and its vCPUs created and set up, never run."""
    with Machine(MachineConfig(boot=BootProtocol.PVH, kernel=write(tmp_path, "k", smoke_pvh_elf()), mem_size=64 * MiB, cpus=4)) as m:
        m._boot()  # loads the kernel and creates the vCPUs, as `run` does before starting them
        yield m


def test_each_vcpu_is_set_up_for_its_index_in_kvm(booted_4: Machine) -> None:
    m = booted_4
    supported = m.kvm.supported_cpuid()
    assert [loop.vcpu.index for loop in m.loops] == [0, 1, 2, 3]
    for loop in m.loops:
        vcpu, i = loop.vcpu, loop.vcpu.index
        got, want = vcpu.get_cpuid(), vcpu_setup.vcpu_cpuid(supported, i, m.host.hidden_kvm_features)
        kvm_features = table(got)[vcpu_setup.KVM_CPUID_FEATURES, 0][0]
        assert kvm_features == table(supported)[vcpu_setup.KVM_CPUID_FEATURES, 0][0] & ~m.host.hidden_kvm_features
        assert topology(got) == topology(want), f"vCPU {i}"
        if not m.host.software_kvm:  # kvm_pvm puts the host's feature bits into leaves 1, 7 and 0xD
            assert table(got) == table(want), f"vCPU {i}"
        apicbase = vcpu.get_msrs([vcpu_setup.MSR_IA32_APICBASE])[vcpu_setup.MSR_IA32_APICBASE]
        assert apicbase & ~0xFFF == layout.LAPIC.base and apicbase & vcpu_setup.APICBASE_ENABLE, f"vCPU {i}: {apicbase:#x}"
        assert bool(apicbase & vcpu_setup.APICBASE_BSP) == (i == 0), f"vCPU {i}: {apicbase:#x}"
        msrs = vcpu.get_msrs(list(vcpu_setup.BOOT_MSRS))
        assert msrs[vcpu_setup.MSR_IA32_MISC_ENABLE] & vcpu_setup.MISC_ENABLE_FAST_STRING
        assert msrs[vcpu_setup.MSR_MTRRdefType] == vcpu_setup.BOOT_MSRS[vcpu_setup.MSR_MTRRdefType]
        lapic_id = struct.unpack_from("<I", kvm.ffi.buffer(vcpu.get_lapic()), APIC_ID)[0] >> 24
        assert lapic_id == i  # the MADT's Processor Local APIC entry i says APIC id i
        want_state = kvm.KVM_MP_STATE_RUNNABLE if i == 0 else kvm.KVM_MP_STATE_UNINITIALIZED  # APs wait for SIPI
        assert vcpu.get_mp_state() == want_state, f"vCPU {i}"
    regs = [loop.vcpu.get_regs() for loop in m.loops]
    assert regs[0].rip == ENTRY  # the boot entry is vCPU 0's alone
    assert all(r.rip == 0xFFF0 for r in regs[1:])  # an AP keeps the reset state until its SIPI


# -- the guest starts its application processors ---------------------------------------------------


def test_ap_started_by_init_sipi_powers_off_while_the_bsp_spins(tmp_path: Path) -> None:
    elf = write(tmp_path, "k", sipi_kernel(real_mode_print(b"AP up\n") + real_mode_poweroff() + HLT_LOOP))
    p = run("--kernel", elf, "--cpus", "2", "--stats", "--stats-json", tmp_path / "s.json", "--trace=serial,acpi-sleep")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "AP up\n"
    assert p.stderr.strip().splitlines()[-1] == "minivmm: guest powered off (ACPI S5)"
    sleep = f"[vcpu1] io out port={layout.ACPI_SLEEP_CONTROL_PORT:#06x} size=1 value=0x34 -> acpi-sleep"
    assert sleep in p.stderr and "[vcpu1] io out port=0x03f8 size=1 value=0x41 -> serial: THR write 'A'" in p.stderr
    assert "[vcpu0] io" not in p.stderr  # the BSP only touched its local APIC (in the kernel)
    assert "vcpu0: " in p.stderr and "vcpu1: 7 exits" in p.stderr
    stats = json.loads((tmp_path / "s.json").read_text())
    assert [v["index"] for v in stats["vcpus"]] == [0, 1]
    assert stats["vcpus"][1]["exits_by_device"] == {"serial": 6, "acpi-sleep": 1}
    assert "acpi-sleep" not in stats["vcpus"][0]["exits_by_device"]
    assert stats["stop"] == {"status": 0, "reason": "guest powered off (ACPI S5)"}


def test_sipi_to_an_absent_apic_id_starts_nothing(tmp_path: Path, null_fd: int) -> None:
    """INIT/SIPI to APIC id 2 of a 2-vCPU machine reach nobody; the BSP then powers off."""
    tail = b"\x66\xba" + struct.pack("<H", layout.ACPI_SLEEP_CONTROL_PORT) + bytes([0xB0, (S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN, 0xEE]) + HLT_LOOP
    elf = write(tmp_path, "k", sipi_kernel(real_mode_print(b"AP up\n") + HLT_LOOP, tail, target=2))
    with Machine(MachineConfig(boot=BootProtocol.PVH, kernel=elf, mem_size=64 * MiB, cpus=2, stdin_fd=null_fd, stdout_fd=null_fd)) as m:
        stop = m.run()
        assert stop.reason == "guest powered off (ACPI S5)" and stop.status == 0
        assert all(not loop.thread.is_alive() for loop in m.loops)  # every vCPU thread ended, the waiting AP's too
        assert m.loops[1].vcpu.get_mp_state() == kvm.KVM_MP_STATE_UNINITIALIZED
        assert m.loops[1].stats.exits == m.loops[1].stats.by_kind["intr"]  # only the kick


@pytest.mark.parametrize("cpus", [1, 2, layout.MAX_VCPUS])
def test_bsp_poweroff_ends_a_machine_whose_aps_never_started(tmp_path: Path, cpus: int, null_fd: int) -> None:
    elf = write(tmp_path, "k", smoke_pvh_elf(b"bye\n"))
    with Machine(MachineConfig(boot=BootProtocol.PVH, kernel=elf, mem_size=64 * MiB, cpus=cpus, stdin_fd=null_fd, stdout_fd=null_fd)) as m:
        stop = m.run()
        assert (stop.status, stop.reason) == (0, "guest powered off (ACPI S5)")
        assert len(m.loops) == cpus and all(not loop.thread.is_alive() for loop in m.loops)
        assert [loop.vcpu.get_mp_state() == kvm.KVM_MP_STATE_UNINITIALIZED for loop in m.loops] == [False] + [True] * (cpus - 1)
        assert len(m.statistics().vcpus) == cpus


AP_UP = real_mode_print(b"AP up\n")


def spinning_pair(tmp_path: Path) -> Path:
    """Both vCPUs end up spinning: the AP after printing "AP up"."""
    return write(tmp_path, "k", sipi_kernel(AP_UP + SPIN))


def test_pause_and_resume_stop_and_restart_every_vcpu(tmp_path: Path, null_fd: int) -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    out = b""

    def ap_up() -> bool:
        nonlocal out
        if select.select([r], [], [], 0)[0]:
            out += os.read(r, 4096)
        return b"AP up\n" in out

    with Machine(MachineConfig(boot=BootProtocol.PVH, kernel=spinning_pair(tmp_path), mem_size=64 * MiB, cpus=2, stdin_fd=null_fd, stdout_fd=w)) as m:
        install_kick_handler()  # run() installs it only on the main thread; it runs on another here
        runner = threading.Thread(target=m.run)
        runner.start()
        try:
            wait_until(ap_up, "the AP's line", timeout=60)
            m.pause()
            assert m.run_state == "paused"
            assert all(loop.paused.is_set() for loop in m.loops)
            exits = [loop.stats.exits for loop in m.loops]
            m.resume()
            assert m.run_state == "running"
            wait_until(lambda: not any(loop.paused.is_set() for loop in m.loops), "both vCPUs running again", timeout=30)
            m.pause()  # each vCPU went back into KVM_RUN and was interrupted again: one more exit each
            assert all(loop.stats.exits > n for loop, n in zip(m.loops, exits))
            m.resume()
        finally:
            m.request_stop(Stop(0, "test over", "host-qmp-quit"))
            runner.join(60)
        assert not runner.is_alive() and all(not loop.thread.is_alive() for loop in m.loops)
    os.close(r)
    os.close(w)


def test_sigusr1_dumps_every_vcpu(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "minivmm", "run", "--boot", "pvh", "--kernel", str(spinning_pair(tmp_path)), "--cpus", "2"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    os.set_blocking(proc.stdout.fileno(), False)
    os.set_blocking(proc.stderr.fileno(), False)
    seen = {"out": b"", "err": b""}

    def read(name: str, fd: int) -> bytes:
        try:
            seen[name] += os.read(fd, 65536)
        except BlockingIOError:
            pass
        return seen[name]

    try:
        wait_until(lambda: b"AP up\n" in read("out", proc.stdout.fileno()), "the AP's line", timeout=60)
        proc.send_signal(signal.SIGUSR1)
        ap_spin = TRAMPOLINE + len(AP_UP)
        spin_ap = f"code at {ap_spin:#x}: eb fe".encode()  # the AP's jmp $
        wait_until(lambda: b"vCPU 0:" in read("err", proc.stderr.fileno()) and b"vCPU 1:" in seen["err"] and spin_ap in seen["err"],
                   "both vCPU dumps", timeout=60)
        assert b"mp_state: runnable" in seen["err"]
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        read("err", proc.stderr.fileno())
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert seen["err"].decode().strip().splitlines()[-1] == "minivmm: stopped by SIGTERM"
