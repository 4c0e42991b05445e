"""The guest profiler (`minivmm run --profile`, `minivmm.profiler`) on real KVM with a tiny
hand-assembled PVH kernel that spins in one known function in ring 0, then drops to ring 3
and spins there: the profile must name the ring-0 function and count the ring-3 time as
"[user]". Also: HZ validation, System.map parsing (hostile maps never raise), the report.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
from bootutil import TRACEBACK, cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import assert_user_error

from minivmm.api import BareVm
from minivmm.disasm import KernelSymbols, LazySymbols, disassemble
from minivmm.errors import UserError
from minivmm.profiler import (
    DEFAULT_HZ,
    MAX_HZ,
    NO_SYMBOL,
    NO_SYMBOL_LOW,
    USER,
    ProfileStats,
    Profiler,
    ProfileSymbols,
    SyncedRegisters,
    VcpuProfile,
    VcpuProfileStats,
    guest_cpl,
    load_system_map,
    parse_hz,
    parse_system_map,
)
from minivmm.stats import MachineStats
from support.idle import wait_until
from support.spin_kernel import LOAD, spin_elf, spin_kernel, system_map
from support.synthetic_kernels import make_pvh_elf

def profile_of(run, stats_json: Path) -> ProfileStats:
    assert run.status == 0, run.describe()
    assert TRACEBACK not in run.stderr, run.describe()
    stats = MachineStats.from_json(stats_json.read_text())
    assert stats.profile is not None, run.describe()
    return stats.profile


def assert_ring0_then_ring3(profile: ProfileStats, hz: int) -> None:
    """Each phase is SPIN_CYCLES of TSC time: kernel_spin tops the kernel samples, the ring-3
    phase is all "[user]" (never "user_spin": user space is not symbolised), both are sampled."""
    functions = profile.functions()
    assert profile.hz == hz
    assert profile.samples >= 20, profile.render_text()
    assert profile.kernel + profile.user == profile.samples == sum(functions.values())
    kernel_functions = Counter({n: k for n, k in functions.items() if n != USER})
    assert kernel_functions.most_common(1)[0][0] == "kernel_spin", profile.render_text()
    assert functions["kernel_spin"] >= 0.9 * profile.kernel, profile.render_text()
    assert functions[USER] == profile.user and "user_spin" not in functions, profile.render_text()
    assert 0.2 <= profile.user / profile.samples <= 0.8, profile.render_text()  # two equal phases in wall time
    assert [v.index for v in profile.vcpus] == [0] and profile.vcpus[0].samples == profile.samples
    assert profile.latency > 0 and profile.handling > 0 and 0 < profile.cost_per_sample < 0.01


def test_disassembly_of_the_ring3_kernel_is_what_the_comments_say() -> None:
    code, functions = spin_kernel()
    off, size = functions["enter_user"]
    text = [t for _, _, t in disassemble(code[off : off + size], LOAD + off, 32, 20)]
    assert text[3] == "wrmsr" and text[-1] == "sysexit"
    off, size = functions["kernel_spin"]
    assert [t.split()[0] for _, _, t in disassemble(code[off : off + size], LOAD + off, 32, 20)][-2:] == ["cmp", "jb"]


def test_profile_names_the_ring0_function_and_counts_ring3_as_user(tmp_path: Path) -> None:
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(spin_elf())
    run = cli("run", "--kernel", kernel, "--boot", "pvh", "--profile=500", "--stats-json", "stats.json", workdir=tmp_path)
    profile = profile_of(run, tmp_path / "stats.json")
    assert_ring0_then_ring3(profile, 500)
    assert profile.symbols == f"ELF .symtab of {kernel}"
    # the report on stderr: totals, the vCPU's share, the cost, the top function
    report = run.stderr
    assert f"profile: {profile.samples} samples at 500 Hz" in report, report
    assert "profile: vcpu0" in report and "µs" in report, report
    top = [line.split() for line in report.splitlines() if line.endswith("kernel_spin") or line.endswith(USER)]
    assert {row[-1] for row in top} == {"kernel_spin", USER}, report
    assert report.strip().splitlines()[-1] == "minivmm: guest powered off (ACPI S5)"


def test_profile_map_names_functions_of_a_kernel_without_symbols(tmp_path: Path) -> None:
    code, functions = spin_kernel()
    kernel = tmp_path / "raw.elf"
    kernel.write_bytes(make_pvh_elf(code))  # no .symtab
    (tmp_path / "System.map").write_text(system_map(functions))
    run = cli("run", "--kernel", kernel, "--boot", "pvh", "--profile", "--profile-map", "System.map", "--stats-json", "stats.json", workdir=tmp_path)
    profile = profile_of(run, tmp_path / "stats.json")
    assert_ring0_then_ring3(profile, DEFAULT_HZ)
    assert profile.symbols == "System.map System.map"


@pytest.mark.parametrize("hz", ["0", "-5", "abc", "1.5", str(MAX_HZ + 1), "99999999999999999999", ""])
def test_profile_hz_must_be_sane(tmp_path: Path, hz: str) -> None:
    assert_user_error(cli("run", "--kernel", "/nonexistent", f"--profile={hz}", workdir=tmp_path), r"--profile=.*HZ")
    with pytest.raises(UserError):
        parse_hz(hz)


def test_profile_hz_in_range() -> None:
    assert parse_hz("1") == 1 and parse_hz("250") == 250 and parse_hz(str(MAX_HZ)) == MAX_HZ


def test_profile_map_errors_are_one_line(tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(make_pvh_elf(spin_kernel()[0]))
    assert_user_error(cli("run", "--kernel", kernel, "--profile-map", "x", workdir=tmp_path), r"--profile-map.*--profile")
    assert_user_error(cli("run", "--kernel", kernel, "--profile", "--profile-map", "missing", workdir=tmp_path), r"missing: no such file")
    assert_user_error(cli("run", "--kernel", kernel, "--profile", "--profile-map", str(tmp_path), workdir=tmp_path), r"not a regular file")
    (tmp_path / "garbage").write_bytes(b"\x00\xff not a map\n" * 10)
    assert_user_error(cli("run", "--kernel", kernel, "--profile", "--profile-map", "garbage", workdir=tmp_path), r"no function symbols")


# -- System.map ------------------------------------------------------------------------------
def test_system_map_functions_end_at_the_next_symbol() -> None:
    text = (
        "0000000001000000 A phys_startup_64\n"
        "ffffffff81000000 T _stext\n"
        "ffffffff81000000 T _text\n"  # a second name at the same address: the first wins
        "ffffffff81000100 t do_idle\n"
        "ffffffff81000180 W weak_fn\n"
        "ffffffff81000200 D some_data\n"
        "ffffffff81001000 T init_fn\t[mod]\n"  # kallsyms' module column
        "garbage line\n"
        "ffffffff81002000 B _end\n"
    )
    symbols = parse_system_map(text)
    assert [name for name, _ in symbols.entries] == ["_stext", "do_idle", "weak_fn", "init_fn"]
    assert [size for _, size in symbols.entries] == [0x100, 0x80, 0x80, 0x1000]
    names = ProfileSymbols(LazySymbols(None), symbols, Path("m"))
    assert names.function(0xFFFFFFFF81000104) == "do_idle"
    assert names.function(0xFFFFFFFF81000300) == NO_SYMBOL  # in data after weak_fn
    assert names.function(0x1000180) == "weak_fn"  # early boot: the physical alias of the kernel map
    assert names.function(0xFFFFFFFF81001FFF) == "init_fn"
    assert names.function(0x7F00000) == NO_SYMBOL_LOW  # e.g. a bzImage's decompressor, identity-mapped


def test_no_symbols_at_all_names_the_address() -> None:
    names = ProfileSymbols(LazySymbols(None))
    assert names.function(0x1234) == "0x1234" and names.source.startswith("none")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=2000),
    st.lists(
        st.tuples(
            st.text("0123456789abcdefABCDEFxg-", max_size=20), st.sampled_from(list("TtWwDdBbA?x ")),
            st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
        ),
        max_size=40,
    ).map(lambda rows: "\n".join(f"{a} {t} {n}" for a, t, n in rows).encode("utf-8")),
))
def test_hostile_system_maps_never_raise_anything_but_a_user_error(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("map") / "System.map"
    path.write_bytes(data)
    try:
        symbols = load_system_map(path)
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert symbols.addresses == sorted(set(symbols.addresses)) and all(a > 0 for a in symbols.addresses)
    assert all(size >= 0 for _, size in symbols.entries)
    names = ProfileSymbols(LazySymbols(None), symbols, path)
    for address in symbols.addresses[:5] + [0, 1 << 63, (1 << 64) - 1]:
        assert isinstance(names.function(address), str)


# -- samples, CPL and the snapshot -------------------------------------------------------------
def test_cpl_is_ss_dpl_in_protected_mode_only() -> None:
    assert guest_cpl(cr0=0, rflags=0x2, ss_dpl=3) == 0  # real mode: CS holds a paragraph, CPL is 0
    assert guest_cpl(cr0=1, rflags=0x2, ss_dpl=0) == 0
    assert guest_cpl(cr0=1, rflags=0x2, ss_dpl=3) == 3
    assert guest_cpl(cr0=1, rflags=0x2 | 1 << 17, ss_dpl=0) == 3  # virtual-8086 mode


class RecordedVcpu:
    """Register values as KVM_GET_REGS/SREGS return them, replayed (unit test of the aggregation)."""

    def __init__(self, rip: int, cpl: int) -> None:
        from types import SimpleNamespace

        self.regs = SimpleNamespace(rip=rip, rflags=0x2)
        self.sregs = SimpleNamespace(cr0=0x80000011, ss=SimpleNamespace(dpl=cpl))

    def get_regs(self):
        return self.regs

    def get_sregs(self):
        return self.sregs


def test_user_samples_aggregate_and_survive_json() -> None:
    profile = VcpuProfile()
    for rip, cpl in [(0xFFFFFFFF81000104, 0)] * 3 + [(0x401000, 3), (0x7FFF0000, 3), (0xFFFFFFFF81000300, 0)]:
        profile.record(RecordedVcpu(rip, cpl))
    kernel, user, latency, handling = profile.snapshot()
    assert user == 2 and kernel == Counter({0xFFFFFFFF81000104: 3, 0xFFFFFFFF81000300: 1}) and handling > 0
    names = ProfileSymbols(LazySymbols(None), KernelSymbols([0xFFFFFFFF81000100], [("do_idle", 0x80)]), Path("m"))
    functions = Counter({names.function(rip): k for rip, k in kernel.items()}) + Counter({USER: user})
    stats = ProfileStats(250, "test", [VcpuProfileStats(0, 4, 2, dict(functions))], 1.0, 0, latency, handling)
    assert stats.functions() == Counter({"do_idle": 3, USER: 2, NO_SYMBOL: 1})
    assert ProfileStats.from_dict(stats.to_dict()) == stats
    text = stats.render_text()
    assert "6 samples at 250 Hz" in text and "guest kernel 66.7 %, user 33.3 %" in text
    assert text.splitlines()[-3].split() == ["3", "50.0", "do_idle"]


def test_synced_registers_are_what_the_ioctls_read() -> None:
    """The sample's register source (kvm_run.s, KVM_CAP_SYNC_REGS) against KVM_GET_REGS/SREGS
    after a real run in long mode: same RIP, RAX, RFLAGS, CR0, CS and SS."""
    with BareVm(ram_size=1 << 20, irqchip=False) as vm:
        vm.load(0x10000, b"\xb8\x34\x12\x00\x00\xf4")  # mov eax, 0x1234; hlt (ends the run)
        vm.start_long_mode(0x10000)
        synced = SyncedRegisters.enable(vm.vcpu)
        assert synced is not None, "KVM_CAP_SYNC_REGS lacks regs/sregs"
        assert vm.run().status == 0
        regs, sregs = vm.vcpu.get_regs(), vm.vcpu.get_sregs()
        got_regs, got_sregs = synced.get_regs(), synced.get_sregs()
        assert regs.rax == got_regs.rax == 0x1234
        assert (got_regs.rip, got_regs.rflags) == (regs.rip, regs.rflags) and 0x10000 < regs.rip <= 0x10006
        assert (got_sregs.cr0, got_sregs.efer) == (sregs.cr0, sregs.efer) and sregs.cr0 & 1
        for seg in ("cs", "ss"):
            a, b = getattr(got_sregs, seg), getattr(sregs, seg)
            assert (a.selector, a.dpl, a.l) == (b.selector, b.dpl, b.l)


class RecordedLoop:
    """A vCPU loop as the sampler sees it (`Sampled`), taking each sample at once from
    recorded registers; `busy` makes it refuse kicks as a vCPU still on the previous one."""

    def __init__(self, rip: int, cpl: int, *, started: bool = True) -> None:
        self.profile: VcpuProfile | None = None
        self.vcpu = RecordedVcpu(rip, cpl)
        self.started = started
        self.busy = False

    def running(self) -> bool:
        return self.started

    def request_sample(self) -> bool:
        if self.busy or self.profile is None:
            return False
        self.profile.record(self.vcpu)
        return True


def test_sampler_samples_every_running_vcpu_and_keeps_per_vcpu_counts(monkeypatch) -> None:
    """The sampler thread with N vCPUs (no KVM: the recorded loops answer kicks at once)."""
    monkeypatch.setattr("minivmm.profiler.SyncedRegisters.enable", staticmethod(lambda vcpu: None))
    table = KernelSymbols([0xFFFFFFFF81000100], [("do_idle", 0x80)])
    loops = [RecordedLoop(0xFFFFFFFF81000110, 0), RecordedLoop(0x401000, 3), RecordedLoop(0, 0, started=False)]
    profiler = Profiler(loops, 1000, ProfileSymbols(LazySymbols(None), table, Path("m")))
    late = RecordedLoop(0xFFFFFFFF81000120, 0)
    loops.append(late)  # a vCPU added after the profiler was made is sampled too
    profiler.start()
    try:
        wait_until(lambda: all(loop.profile is not None and loop.profile.samples >= 5 for loop in (loops[0], loops[1], late)),
                   "5 samples of each running vCPU")
        loops[1].busy = True
        wait_until(lambda: profiler.missed > 0, "a kick refused by a busy vCPU")
    finally:
        profiler.stop()
    stats = profiler.statistics()
    assert [v.index for v in stats.vcpus] == [0, 1, 2, 3]
    assert stats.vcpus[2].samples == 0  # never started: never kicked
    assert stats.vcpus[0].functions == {"do_idle": stats.vcpus[0].samples}
    assert stats.vcpus[1].functions == {USER: stats.vcpus[1].samples} and stats.vcpus[1].kernel == 0
    assert stats.samples == sum(v.samples for v in stats.vcpus) and stats.user == stats.vcpus[1].samples
    assert stats.duration > 0 and stats.hz == 1000
    assert f"vcpu1 {stats.vcpus[1].samples} (" in stats.render_text()


def test_profiler_kicks_are_no_progress_for_the_watchdog(tmp_path: Path) -> None:
    """A guest spinning without exits is stuck: the profiler's EINTR exits must not hide it."""
    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(make_pvh_elf(b"\xeb\xfe"))  # jmp $
    run = cli("run", "--kernel", kernel, "--profile=200", "--watchdog", "1", "--stats-json", "stats.json", workdir=tmp_path)
    assert run.status == 1 and "watchdog: no exit to the VMM for 1 s" in run.stderr, run.describe()
    stats = MachineStats.from_json((tmp_path / "stats.json").read_text())
    assert stats.profile is not None and stats.profile.samples > 0 and stats.vcpus[0].by_kind["intr"] > 0


def test_profile_survives_the_stats_json_round_trip() -> None:
    profile = ProfileStats(100, "System.map m", [VcpuProfileStats(0, 3, 1, {"do_idle": 3, USER: 1})], 2.0, 1, 0.5, 0.01)
    stats = MachineStats(vcpus=[], wall_time=1.0, process_start=0.0, profile=profile)
    again = MachineStats.from_json(stats.to_json())
    assert again.profile == profile and again.to_dict()["profile"]["functions"] == {"do_idle": 3, USER: 1}
    assert MachineStats.from_json(MachineStats(vcpus=[], wall_time=1.0, process_start=0.0).to_json()).profile is None


def test_a_failing_sampler_thread_is_reported_not_silent(capsys) -> None:
    """A sampler failure (a VMM bug) ends sampling with one line on stderr and keeps the error."""

    class BrokenLoop(RecordedLoop):
        def request_sample(self) -> bool:
            raise RuntimeError("kick failed")

    loop = BrokenLoop(0, 0)
    loop.profile = VcpuProfile()
    profiler = Profiler([loop], 1000, ProfileSymbols(LazySymbols(None)))
    profiler.start()
    try:
        wait_until(lambda: profiler.errors, "the sampler's error")
    finally:
        profiler.stop()
    assert [str(e) for e in profiler.errors] == ["kick failed"]
    assert "minivmm: profiler failed: RuntimeError: kick failed" in capsys.readouterr().err


def test_an_ap_waiting_for_sipi_gives_no_samples() -> None:
    """Real KVM, two vCPUs: the BSP spins and never starts the AP, whose thread sits in
    KVM_RUN's wait-for-SIPI; kicks reach both, but only the BSP's count as guest samples
    (new-user finding: the AP's reset RIP was counted as guest-kernel time)."""
    with BareVm(ram_size=1 << 20, cpus=2) as vm:
        vm.load(0x10000, bytes.fromhex("eb fe"))  # jmp $
        vm.start_long_mode(0x10000)
        profiler = Profiler(vm.loops, 1000, ProfileSymbols(LazySymbols(None)))
        profiler.start()
        stopper = threading.Thread(target=lambda: (
            wait_until(lambda: vm.loop.profile is not None and vm.loop.profile.samples >= 20, "20 samples of the BSP"),
            vm.stop(0, "sampled"),
        ))
        stopper.start()
        try:
            assert vm.run(timeout=60).reason == "sampled"
        finally:
            stopper.join()
            profiler.stop()
        stats = profiler.statistics()
    assert stats.vcpus[0].samples >= 20 and stats.vcpus[1].samples == 0


def test_a_huge_profile_map_is_refused_without_reading_it_all(tmp_path: Path, monkeypatch) -> None:
    from minivmm import profiler

    monkeypatch.setattr(profiler, "MAX_SYSTEM_MAP", 1 << 10)
    big = tmp_path / "big.map"
    big.write_text("ffffffff81000000 T f\n" * 100)  # 2100 bytes
    with pytest.raises(UserError, match="larger than"):
        profiler.load_system_map(big)
    small = tmp_path / "small.map"
    small.write_text("ffffffff81000000 T f\n")
    assert profiler.load_system_map(small).addresses


def test_sampling_that_would_starve_an_emulated_guest_is_warned_about() -> None:
    from minivmm.profiler import sampling_warning

    assert sampling_warning(100, 1, True) is None and sampling_warning(10_000, 8, False) is None
    assert "about 35%" in sampling_warning(250, 2, True)  # type: ignore[operator]
    assert "loses most of its time" in sampling_warning(10_000, 8, True)  # type: ignore[operator]
