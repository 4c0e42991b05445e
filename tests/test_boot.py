"""Boot the real default guest on the real /dev/kvm, as a user would, and check what comes out.

Exactly three boots, each checking as much as it can: a boot costs minutes of one CPU core on a
software KVM (kvm_pvm), so with ``pytest -n 2`` this file takes about two boot-times.

1. the vmlinux through the Linux 64-bit boot protocol (the default) ending in an ACPI S5
   power-off, with --stats;
2. the bzImage through the 64-bit boot protocol, ending in a reboot (i8042 reset), profiled;
3. the vmlinux through PVH (`--boot pvh`), ending in a kernel panic reported through pvpanic.

Nothing is mocked. Each boot's stdout/stderr stay in the test's tmp_path.
"""

from __future__ import annotations

import re

import pytest
from minivmm import hostcheck
from bootutil import SOFTWARE_KVM, TRACEBACK, index_of, init_lines, kernel_command_line, run_minivmm
from support.runner import RunResult

pytestmark = pytest.mark.boot

BASE_CMDLINE = "console=ttyS0 panic=-1 reboot=k rdinit=/sbin/minivmm-test"
SOFTWARE_KVM_NOTICE = "minivmm: software KVM (kvm_pvm) detected: "


def boot(args: list, tmp_path, record_property) -> RunResult:
    run = run_minivmm(args, tmp_path)
    record_property("boot_seconds", round(run.wall, 1))
    print(f"boot took {run.wall:.1f} s (status {run.status})")
    assert TRACEBACK not in run.stderr, run.describe()
    assert run.stats is not None, f"no --stats-json written\n{run.describe()}"
    assert (run.stats.stop_status, f"minivmm: {run.stats.stop_reason}") == (run.status, last_line(run.stderr)), run.describe()
    return run


def last_line(text: str) -> str:
    lines = text.rstrip("\n").splitlines()
    return lines[-1] if lines else ""


def assert_in_order(run: RunResult, lines: list[str], patterns: list[str]) -> list[re.Match]:
    """Each regex matches a later init line than the previous one; returns the matches."""
    matches, pos = [], 0
    for pattern in patterns:
        i = index_of(lines, pattern, pos)
        assert i >= 0, f"no init line matching {pattern!r} after line {pos} of {lines}\n{run.describe()}"
        matches.append(re.search(pattern, lines[i]))
        pos = i + 1
    return matches


def assert_command_line(run: RunResult, given: str) -> str:
    """The kernel echoed our command line; on a software KVM minivmm appended clearcpuid= (and,
    for an SMP kernel, the SMP boot remedies)."""
    echoed = kernel_command_line(run.stdout)
    assert echoed is not None, f"the kernel did not print 'Command line: ...'\n{run.describe()}"
    assert echoed == given or echoed.startswith(given + " "), f"echoed {echoed!r}, given {given!r}"
    added = echoed[len(given) :].split()
    if SOFTWARE_KVM:
        assert any(w.startswith("clearcpuid=") for w in added), f"clearcpuid= not added on kvm_pvm: {echoed!r}"
        # The SMP-only remedies follow the kernel's own banner ("Linux version ... #N SMP ...").
        banner = re.search(r"^Linux version .*$", run.stdout, re.MULTILINE)
        assert banner, f"no kernel banner\n{run.describe()}"
        smp = bool(re.search(r"\) #\d+ SMP\b", banner.group(0)))
        assert hostcheck.software_kvm_cmdline(smp).split() == added, f"SMP kernel {smp}, added {added}"
        notice = [line for line in run.stderr.splitlines() if line.startswith(SOFTWARE_KVM_NOTICE)]
        assert notice and "clearcpuid=" in notice[0], f"no software-KVM notice on stderr\n{run.describe()}"
    else:
        assert "clearcpuid=" not in echoed, f"clearcpuid= added without kvm_pvm: {echoed!r}"
        assert not set(hostcheck.SOFTWARE_KVM_BOOT_PARAMS) & set(echoed.split()), echoed
        assert "software KVM" not in run.stderr, run.describe()
    assert "software KVM" not in run.stdout  # notices go to stderr, the console to stdout
    return echoed


def test_vmlinux_poweroff_with_stats(guest, tmp_path, record_property):
    """vmlinux (Linux 64-bit boot protocol, the default) + initramfs; the test init runs four
    steps and powers off (ACPI S5). The RNG seed minivmm passes (setup_data) made the CRNG
    ready before init ran."""
    cmdline = f"{BASE_CMDLINE} minivmm.steps=hello,mounts,uname,getpid minivmm.end=poweroff"
    run = boot(["--cmdline", cmdline, "--stats"], tmp_path, record_property)
    assert run.status == 0, run.describe()
    assert last_line(run.stderr) == "minivmm: guest powered off (ACPI S5)", run.describe()

    # The kernel log, then the init's lines in order, then the power-off.
    assert re.search(r"^Linux version \S+", run.stdout, re.MULTILINE), run.describe()
    assert_command_line(run, cmdline)
    lines = init_lines(run.stdout)
    _, _, _, getpid, done, _ = assert_in_order(
        run,
        lines,
        [
            r"^hello pid=1$",
            r"^mounts proc=ok sys=ok dev=ok$",
            r"^uname sysname=Linux release=\S+ machine=x86_64 ",
            r"^getpid n=(\d+) total_ns=(\d+) ns_per_call=(\d+)$",
            r"^done ok=(\d+) failed=(\d+)$",
            r"^end action=poweroff$",
        ],
    )
    n, total_ns, ns_per_call = map(int, getpid.groups())
    assert n > 0 and ns_per_call > 0 and total_ns >= ns_per_call * n, getpid.group(0)
    assert done.groups() == ("4", "0"), done.group(0)
    assert not [line for line in lines if "FAILED" in line or line.startswith("unknown step")], lines
    assert run.stdout.find("reboot: Power down") > run.stdout.find("minivmm-test: end action=poweroff") >= 0, run.describe()
    assert "Kernel panic" not in run.stdout
    crng, run_init = run.stdout.find("random: crng init done"), run.stdout.find("Run /sbin/minivmm-test as init process")
    assert 0 <= crng < run_init, f"crng init done at {crng}, Run /sbin/minivmm-test at {run_init}\n{run.describe()}"

    # --stats-json: exits by kind, devices, time inside/outside KVM_RUN.
    stats = run.stats
    (vcpu0,) = stats.vcpus
    exits, devices = vcpu0.by_kind, vcpu0.by_device
    assert exits["io"] > 0, f"no io exits in --stats-json\n{run.describe()}"
    assert devices["serial"] > 0, f"no serial device in --stats-json\n{run.describe()}"
    assert devices["acpi-sleep"] > 0, run.describe()  # the S5 write that ended the run
    # string I/O makes one exit count several accesses: accesses >= I/O and MMIO exits
    assert sum(devices.values()) >= exits["io"] + exits["mmio"]
    inside, outside, wall = vcpu0.time_in_run, vcpu0.time_outside, stats.wall_time
    assert vcpu0.exits == sum(exits.values()) > 0, exits
    assert inside > 0 and outside > 0, (inside, outside)
    assert inside + outside <= wall + 0.01, (inside, outside, wall)
    assert wall <= run.wall and stats.startup is not None and 0 < stats.startup < run.wall, (stats.startup, wall, run.wall)
    # --stats printed the same structure as text, just before the final line, on stderr only
    report = stats.render_text().splitlines()
    err = run.stderr.splitlines()
    assert report[0].startswith("startup: first KVM_RUN ") and report[1].startswith(f"vcpu0: {vcpu0.exits} exits; ")
    assert err[-1 - len(report) : -1] == report, run.describe()
    assert "exits io:" not in run.stdout


def test_bzimage_reboot(guest, tmp_path, record_property):
    """The bzImage through the 64-bit boot protocol (boot_params at the zero page), with the
    default initramfs; the init reboots and `reboot=k` makes the kernel reset through the i8042."""
    cmdline = f"{BASE_CMDLINE} minivmm.steps=hello,uname minivmm.end=reboot"
    run = boot(["--kernel", guest.bzimage, "--initrd", guest.initrd, "--cmdline", cmdline, "--profile"], tmp_path, record_property)
    assert run.status == 0, run.describe()
    assert last_line(run.stderr) == "minivmm: guest rebooted (i8042 reset)", run.describe()

    # The kernel found the command line and the initrd through boot_params.
    assert re.search(r"^Linux version \S+", run.stdout, re.MULTILINE), run.describe()
    assert_command_line(run, cmdline)
    assert re.search(r"^RAMDISK: \[mem 0x[0-9a-f]+-0x[0-9a-f]+\]", run.stdout, re.MULTILINE), run.describe()
    lines = init_lines(run.stdout)
    assert_in_order(
        run,
        lines,
        [r"^hello pid=1$", r"^uname sysname=Linux .*machine=x86_64 ", r"^done ok=2 failed=0$", r"^end action=reboot$"],
    )
    assert run.stdout.find("reboot: Restarting system") > run.stdout.find("minivmm-test: end action=reboot") >= 0, run.describe()
    assert "Kernel panic" not in run.stdout
    assert "Power down" not in run.stdout

    # --profile: a bzImage has no symbols, so the default guest's System.map names the functions.
    profile = run.stats.profile
    system_map = guest.bzimage.parent / "System.map"
    assert profile is not None and profile.samples > 0, run.describe()
    assert profile.symbols == f"System.map {system_map}", profile.symbols
    mapped = {line.split()[2] for line in system_map.read_text().splitlines() if len(line.split()) >= 3}
    functions = profile.functions()
    named = [name for name in functions if not name.startswith("[")]
    assert named and set(named) <= mapped, (set(named) - mapped, profile.render_text())
    # The bzImage's decompressor runs at physical addresses below 4 GiB that no kernel symbol
    # covers (README "Profiling the guest"); since the boot got faster it is about half of the
    # samples. Of the others, most must have a name.
    decompressor = functions.get("[no symbol, below 4 GiB]", 0)
    assert decompressor > 0, profile.render_text()
    assert sum(functions[n] for n in named) > (profile.samples - decompressor) * 3 // 4, profile.render_text()
    assert profile.kernel + profile.user == profile.samples and profile.kernel > 0
    assert profile.render_text().splitlines()[0] in run.stderr, run.describe()


def test_pvh_panic(guest, tmp_path, record_property):
    """vmlinux through PVH; init exits (minivmm.end=panic): "Attempted to kill init", and
    pvpanic ends the run."""
    cmdline = f"{BASE_CMDLINE} minivmm.steps=hello minivmm.end=panic"
    run = boot(["--boot", "pvh", "--cmdline", cmdline], tmp_path, record_property)
    assert run.status != 0, run.describe()
    # boot() checked that the final line is this reason (the old check: "minivmm: guest ...\bpanic")
    assert run.stats.stop_reason == "guest kernel panicked (pvpanic)", run.describe()

    assert_command_line(run, cmdline)
    assert_in_order(run, init_lines(run.stdout), [r"^hello pid=1$", r"^done ok=1 failed=0$", r"^end action=panic$"])
    m = re.search(r"Kernel panic - not syncing: Attempted to kill init! exitcode=(0x[0-9a-f]+)", run.stdout)
    assert m, f"no kernel panic message\n{run.describe()}"
    assert int(m.group(1), 16) == 7 << 8, m.group(0)  # exit(7), as a wait status
    assert run.stdout.index("minivmm-test: end action=panic") < m.start()
