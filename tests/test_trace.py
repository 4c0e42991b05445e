"""`--trace` in a learner's words: what each access meant (the devices' `describe`), the
`--trace=LIST` filter, and instruction bytes shown disassembled (capstone) with the symbol."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from minivmm import layout
from minivmm.devices.serial import Serial16550
from minivmm.disasm import KernelSymbols, LazySymbols, describe_code, instruction_words
from minivmm.exit_handler import trace_wanted
from minivmm.register_block import Register, RegisterBlock
from minivmm.stats import ExitRecord
from support.fakes import FakeInterruptController
from support.synthetic_kernels import smoke_pvh_elf
from tinyguest import CODE, Asm, kick_handler, make_guest  # noqa: F401  (pytest fixtures, used by name)

REPO = Path(__file__).resolve().parents[1]
MMIO = 0xD000_0000


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    kernel = tmp_path / "k"
    kernel.write_bytes(smoke_pvh_elf(b"hi"))
    env = {"PYTHONPATH": ":".join([str(REPO), *sys.path])}
    return subprocess.run(
        [sys.executable, "-m", "minivmm", "run", "--kernel", str(kernel), *args],
        capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
    )


def traced(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[vcpu0] ")]


# -- describe ----------------------------------------------------------------------------------
def test_register_block_names_whole_and_partial_registers() -> None:
    block = RegisterBlock((Register(0, 2, "queue_select", lambda: 0, lambda v: None), Register(2, 8, "queue_desc", lambda: 0)))
    assert block.describe(0, 2, 0, True) == "queue_select = 0"
    assert block.describe(2, 8, 0x1234, False) == "queue_desc -> 0x1234"
    assert block.describe(6, 4, 0xAB, True) == "queue_desc[4:8] = 0xab"
    assert block.describe(1, 2, 0x300, False) == "queue_select[1:2]/queue_desc[0:1] -> 0x300"
    assert block.describe(20, 1, 0, False) is None


def test_serial_says_which_register_and_which_character() -> None:
    serial = Serial16550(irq=None, output=lambda data: None)
    assert serial.describe(0, 1, ord("h"), True) == "THR write 'h'"
    assert serial.describe(0, 1, 0x0A, True) == "THR write '\\n'"
    assert serial.describe(5, 1, 0x60, False) == "LSR -> 0x60"
    serial.write(3, 1, 0x80)  # LCR.DLAB: offsets 0 and 1 are the divisor latch
    assert serial.describe(0, 1, 1, True) == "DLL = 1"


def test_pci_conf1_and_virtio_common_cfg_say_what_the_guest_did() -> None:
    from minivmm.pci.host import Conf1, config_register_name

    class Bridge:
        def _function(self, address: int) -> object | None:
            return object() if (address >> 11) & 0x1F == 2 else None

    conf1 = Conf1(Bridge())  # type: ignore[arg-type]
    address = 0x8000_0000 | 2 << 11 | 0x10
    assert conf1.describe(0, 4, address, True) == "PCI conf1 select 00:02.0 0x10"
    conf1.address = address
    assert conf1.describe(4, 4, 0xFFFF_FFFF, True) == "PCI conf1 00:02.0 BAR0 sizing"
    assert conf1.describe(4, 4, 0xFEBF_0000, True) == "PCI conf1 00:02.0 BAR0 = 0xfebf0000"
    conf1.address = 0x8000_0000 | 2 << 11
    assert conf1.describe(4, 2, 0x1AF4, False) == "PCI conf1 00:02.0 vendor_id -> 0x1af4"
    conf1.address = 0x8000_0000 | 3 << 11
    assert conf1.describe(4, 4, 0xFFFF_FFFF, False) == "PCI conf1 00:03.0 (no device) -> all ones"
    assert config_register_name(0x48) == "config 0x48" and config_register_name(0x14) == "BAR1"


def test_virtio_bar_names_the_common_cfg_register() -> None:
    from minivmm.devices.virtio.pci import COMMON_CFG_OFFSET, NOTIFY_CFG_OFFSET, VirtioPciDevice
    from minivmm.devices.virtio.pmem import VirtioPmem
    from minivmm.memory import GuestMemory

    transport = VirtioPciDevice(VirtioPmem(-1, 0, 2 << 20), GuestMemory(), FakeInterruptController())
    router = transport.router
    assert router.describe(COMMON_CFG_OFFSET + 0x16, 2, 0, True) == "virtio common_cfg queue_select = 0"
    assert router.describe(COMMON_CFG_OFFSET + 0x14, 1, 0xF, True) == "virtio common_cfg device_status = 0xf"
    assert router.describe(NOTIFY_CFG_OFFSET, 2, 0, True) == "virtio notify_cfg queue 0 notified (no ioeventfd caught it)"


def test_trace_filter_matches_kinds_device_words_and_meaning() -> None:
    serial = ExitRecord("io", "out", 0x3F8, 1, 0x68, "serial", "THR write 'h'")
    bar = ExitRecord("mmio", "write", 0xFE000016, 2, 0, "pci-00:01.0-pmem0-bar0", "virtio common_cfg queue_select = 0")
    assert trace_wanted(frozenset(), serial) and trace_wanted(frozenset(), bar)
    assert trace_wanted(frozenset({"serial"}), serial) and not trace_wanted(frozenset({"serial"}), bar)
    assert trace_wanted(frozenset({"virtio"}), bar) and trace_wanted(frozenset({"pmem0"}), bar)
    assert trace_wanted(frozenset({"pci"}), bar) and trace_wanted(frozenset({"mmio"}), bar)
    assert not trace_wanted(frozenset({"io"}), bar) and trace_wanted(frozenset({"io"}), serial)


def test_cli_trace_list_limits_the_trace(tmp_path: Path) -> None:
    everything = run(tmp_path, "--trace")
    assert everything.returncode == 0, everything.stderr
    lines = traced(everything.stderr)
    port = f"port={layout.COM1_PORT:#06x}"
    assert f"[vcpu0] io out {port} size=1 value=0x68 -> serial: THR write 'h'" in lines
    assert any("-> acpi-sleep: SLEEP_CONTROL_REG = " in line for line in lines)
    only = run(tmp_path, "--trace=acpi-sleep")
    assert only.returncode == 0, only.stderr
    assert traced(only.stderr) == [line for line in lines if "-> acpi-sleep" in line] != []
    serial = run(tmp_path, "--trace", "serial,unclaimed")
    assert traced(serial.stderr) == [line for line in lines if "-> serial" in line]
    bad = run(tmp_path, "--trace=serial,,io")
    assert bad.returncode == 2 and bad.stderr.strip().endswith("an empty name in the list")


def test_an_mmio_exit_trace_line_shows_the_access_and_the_instruction(make_guest) -> None:
    """KVM has moved RIP past a write's instruction when it exits (the write is all that is
    left to do); a read's instruction is still at RIP (KVM completes it with the data)."""
    g = make_guest(long_mode=True)
    regs = RegisterBlock((Register(0, 1, "CTRL", lambda: 0x33, lambda v: None),))
    g.mmio.register(MMIO, 0x1000, regs, "regs")
    out = io.StringIO()
    g.loop.parts.trace = out
    a = Asm(64)
    a.mov_acc_imm(1, 0x5A)
    a.store_acc(MMIO, 1)  # movabs byte ptr [0xd0000000], al
    load_at = a.addr
    a.load_acc(MMIO, 1)  # movabs al, byte ptr [0xd0000000]
    after_load = a.addr
    a.done()
    g.run_ok(a)
    write, read = [line for line in out.getvalue().splitlines() if " mmio " in line]
    assert write == f"[vcpu0] mmio write addr={MMIO:#x} size=1 value=0x5a -> regs: CTRL = 0x5a [rip after the write: {load_at:#x}: a0 00 00 00 d0 00 00 00 00  movabs al, byte ptr [{MMIO:#x}]]"
    assert read == f"[vcpu0] mmio read addr={MMIO:#x} size=1 value=0x33 -> regs: CTRL -> 0x33 [at rip: {load_at:#x}: a0 00 00 00 d0 00 00 00 00  movabs al, byte ptr [{MMIO:#x}]]"
    assert after_load > load_at


# -- disassembly -------------------------------------------------------------------------------
def test_describe_code_disassembles_in_the_cpu_mode_with_symbols() -> None:
    symbols = KernelSymbols([0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_8100_0040], [("startup_64", 0x40), ("do_idle", 0x100)])
    assert symbols.lookup(0xFFFF_FFFF_8100_0052) == "do_idle+0x12/0x100"
    assert symbols.lookup(0x0100_0004) == "startup_64+0x4/0x40"  # early boot runs at the physical alias
    assert symbols.lookup(0x10) is None
    lazy = LazySymbols(None)
    lazy._symbols, lazy._loaded = symbols, True
    text = describe_code(b"\x0f\x0b\xf4", 0xFFFF_FFFF_8100_0040, 64, lazy, count=2)
    assert text.splitlines() == [
        "0xffffffff81000040 <do_idle+0x0/0x100>: 0f 0b  ud2",
        "0xffffffff81000042 <do_idle+0x2/0x100>: f4  hlt",
    ]
    assert describe_code(b"\xb8\x34\x12", 0x7C00, 16) == "0x7c00: b8 34 12  mov ax, 0x1234"
    assert describe_code(b"\x0f", 0x1000, 64) == "0x1000: 0f  (not a valid 64-bit instruction)"
    assert instruction_words(b"\xcc", 0xFFFF_FFFF_8100_0041, 64, lazy) == "int3 in do_idle+0x1/0x100"


def test_symbols_come_from_a_vmlinux_symtab_only(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(smoke_pvh_elf())  # an ELF without .symtab
    assert KernelSymbols.from_elf(kernel) is None
    assert KernelSymbols.from_elf(tmp_path / "missing") is None


def test_symbols_of_the_default_guest_vmlinux(guest) -> None:
    symbols = KernelSymbols.from_elf(guest.vmlinux)
    assert symbols is not None and len(symbols.addresses) > 1000
    assert symbols.addresses == sorted(set(symbols.addresses))
    i = next(i for i, (name, _) in enumerate(symbols.entries) if name == "startup_64")
    start, size = symbols.addresses[i], symbols.entries[i][1]
    assert start >> 32 == 0xFFFF_FFFF and size > 1  # the kernel map; a sized function
    assert symbols.lookup(start + 1) == f"startup_64+0x1/{size:#x}"
    assert symbols.lookup(start + 1 - 0xFFFF_FFFF_8000_0000) == f"startup_64+0x1/{size:#x}"  # its physical alias
