"""Does guest user space work on this host? One boot of the default guest running
`minivmm.script=selftest` (guest/scripts/selftest.sh): busybox /init, mounts, the kernel
command line, 50 fork+exec+wait cycles, a 1-second sleep, writes through the serial tty, a
pipe between two programs (10 times), then poweroff; plus the host's view: wall time against
the guest's clock, the exit status, the emulation fallbacks of --stats-json.

The test is a probe: every check runs, and when something is broken the message lists what,
starting with the first broken step (the first selftest line that is missing or FAILED), then
the last `minivmm:` line the guest printed and the tails of the console and of the VMM's
stderr. A run that outlives the timeout is
asked for a vCPU dump (SIGUSR1) and stopped with SIGTERM (which still writes --stats-json) before
the test fails, so a stuck guest is never a silent timeout.

Reading the console: every selftest line goes to /dev/kmsg (printk writes it to the UART
at once, whole) and to the tty (drained later, 16 bytes at a time when the port is polled), so a
kernel-log record can land in the middle of a tty line. The record always ends its console
line, so for each line only its last `minivmm: ` message is taken, and for each step the first
copy (the kernel log's, written before the tty's) counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from bootutil import BOOT_TIMEOUT, SOFTWARE_KVM, TRACEBACK
from support.runner import RunResult, run_minivmm

CMDLINE = "console=ttyS0 quiet panic=-1 reboot=k minivmm.script=selftest"
STEPS = ("mounts", "cmdline", "fork-exec", "sleep", "tty", "pipe")  # in the order they run
FORK_EXEC_N = 50  # guest/scripts/selftest.sh FORK_EXEC_N
DONE_MARKER = "minivmm: selftest done"
TTY_CHECKS = ("minivmm: tty-check via /dev/console", "minivmm: tty-check via /dev/ttyS0")
SLEEP_RANGE_S = (0.9, 10.0)

STEP_RE = re.compile(r"^selftest (?P<step>[\w-]+): (?P<status>ok|FAILED)\b ?(?P<rest>.*)$")
DONE_RE = re.compile(r"^selftest done ok=(?P<ok>\d+) failed=(?P<failed>\d+) uptime=(?P<uptime>[\d.]+)$")
KV_RE = re.compile(r"(\w+)=(\S+)")
# The selftest's kernel-log report: record numbers of "random: crng init done" and "Run /init
# as init process" (0: absent).
KMSG_RE = re.compile(r"^selftest kmsg records=(?P<records>\d+) crng_init_done=(?P<crng>\d+) run_init=(?P<run_init>\d+)$")
PIPE_OK_RE = re.compile(r"^ls /bin \| wc -l = (?P<n>[1-9]\d*), (?P<runs>\d+) runs:(?: (?P=n))+$")


# --- running: the one runner, noting when the selftest's last line reached the console ----------


@dataclass
class Probe:
    run: RunResult

    @property
    def timed_out(self) -> bool:
        return self.run.timed_out

    @property
    def done_at(self) -> float | None:
        """Seconds after the spawn when the `done` line arrived on the console."""
        return self.run.marks.get(DONE_MARKER)

    @property
    def notes(self) -> list[str]:
        return self.run.notes


def run_probe(args: list[str], workdir: Path, timeout: float = BOOT_TIMEOUT) -> Probe:
    """The run; one outliving `timeout` gets a vCPU dump (SIGUSR1) and SIGTERM (tests/support/runner.py)."""
    return Probe(run_minivmm(args, workdir, timeout=timeout, markers=[DONE_MARKER]))


# --- reading the console -------------------------------------------------------------------


def guest_messages(stdout: str) -> list[str]:
    """Each console line's last `minivmm: ` message, prefix removed, in order (see the module
    docstring for why the last one)."""
    found = []
    for line in stdout.splitlines():
        i = line.rfind("minivmm: ")
        if i >= 0:
            found.append(line[i + len("minivmm: ") :].rstrip("\r"))
    return found


def selftest_steps(messages: list[str]) -> dict[str, re.Match]:
    """The first `selftest STEP: ok|FAILED ...` line of each step."""
    steps: dict[str, re.Match] = {}
    for text in messages:
        m = STEP_RE.match(text)
        if m and m["step"] not in steps:
            steps[m["step"]] = m
    return steps


def fields(m: re.Match) -> dict[str, str]:
    return dict(KV_RE.findall(m["rest"]))


def first_broken(messages: list[str], excused: tuple[str, ...] = ()) -> str | None:
    """What a failing probe reports first: the first selftest step that is missing or FAILED.
    A FAILED step named in `excused` is judged by its own test (see test_pipes_...)."""
    steps = selftest_steps(messages)
    if "selftest start" not in messages:
        return "the selftest never started (no `minivmm: selftest start`)"
    failed_excused = 0
    for name in STEPS:
        m = steps.get(name)
        if m is None:
            return f"step {name}: no result line"
        if m["status"] != "ok":
            if name in excused:
                failed_excused += 1
                continue
            return f"step {name}: FAILED {m['rest']}"
    done = next((DONE_RE.match(t) for t in messages if DONE_RE.match(t)), None)
    if done is None:
        return "no `minivmm: selftest done ok=N failed=M uptime=S` line"
    if int(done["failed"]) != failed_excused or int(done["ok"]) + failed_excused != len(STEPS):
        return f"selftest done ok={done['ok']} failed={done['failed']} (want ok={len(STEPS)} failed=0)"
    return None


def crng_problem(messages: list[str]) -> str | None:
    """None when the kernel log says the CRNG was ready before /init ran (the RNG seed minivmm
    passes as setup_data was credited); else what is wrong."""
    report = next((m for t in messages if (m := KMSG_RE.match(t))), None)
    if report is None:
        return "no `minivmm: selftest kmsg ...` report (could dmesg run?)"
    records, crng, run_init = int(report["records"]), int(report["crng"]), int(report["run_init"])
    if not 0 < run_init <= records:
        return f"`Run /init as init process` not in the kernel log: {report[0]}"
    if not 0 < crng < run_init:
        return f"the CRNG was not ready before /init (`random: crng init done` must come first): {report[0]}"
    return None


def diagnosis(probe: Probe, problem: str) -> str:
    messages = guest_messages(probe.run.stdout)
    broken = first_broken(messages) or "none (every selftest step passed)"
    last = messages[-1] if messages else "(none)"
    notes = "".join(f"note: {n}\n" for n in probe.notes)
    return (
        f"{problem}\nfirst broken selftest step: {broken}\nlast guest `minivmm:` line: {last!r}\n{notes}"
        f"{probe.run.describe(60)}"
    )


# --- the test --------------------------------------------------------------------------------


# A real run's console (`minivmm run --cmdline "$CMDLINE"` on kvm_pvm, where the pipe step
# crashed): what the readers above are tested on. Re-capture it from a real run (this test's
# minivmm.stdout, CRLF kept) when the guest's lines change. (Captured 2026-11-30 with a
# default guest built from a sibling branch, whose /init also printed two power-button lines
# that this branch's /init does not: those two lines were taken out.)
REAL_CONSOLE = Path(__file__).parent / "data" / "selftest-kvm_pvm.console"
FORK_EXEC_FIELDS = {"n": "50", "ms": "59970", "us_per_cycle": "1199400", "pids": "50", "exec_comm": "cat", "exit_status": "7"}
SLEEP_MS, TTY_IRQ = "2190", "25"  # what that run printed


def real_console() -> str:
    return REAL_CONSOLE.read_bytes().decode().replace("\r\n", "\n")


def interleave(console: str, at: str, record: str, cut: int) -> str:
    """`console` with the kernel-log record `record` (a whole line) written into the middle of
    the tty copy of line `at`, `cut` characters in: how the UART interleaves them (see the
    module docstring). The tty copy is the second occurrence of the line."""
    first = console.index(at)
    second = console.index(at, first + len(at)) + cut
    return console[:second] + record + "\n" + console[second:]


def test_reading_a_real_selftest_run() -> None:
    messages = guest_messages(real_console())
    steps = selftest_steps(messages)
    assert list(steps) == list(STEPS)
    assert fields(steps["fork-exec"]) == FORK_EXEC_FIELDS
    assert fields(steps["sleep"])["ms"] == SLEEP_MS and fields(steps["tty"])["irq"] == TTY_IRQ
    assert steps["pipe"]["status"] == "FAILED" and not PIPE_OK_RE.match(steps["pipe"]["rest"])
    assert PIPE_CRASH_RE.search(steps["pipe"]["rest"])  # the capture met kvm_pvm's known crash
    for other in ("run 2 of 10: wc counted 76, want 77; earlier runs: 77", "run 1 of 10: wc exited with status 1; earlier runs: none"):
        assert not PIPE_CRASH_RE.search(other)  # a miscount or another failure is no excuse
    assert first_broken(messages) == f"step pipe: FAILED {steps['pipe']['rest']}"
    assert first_broken(messages, excused=("pipe",)) is None
    no_done = [m for m in messages if not DONE_RE.match(m)]
    assert first_broken(no_done, excused=("pipe",)).startswith("no `minivmm: selftest done")
    miscounted = [m.replace("failed=1", "failed=0") for m in messages]  # a done line that disagrees
    assert first_broken(miscounted, excused=("pipe",)) == "selftest done ok=5 failed=0 (want ok=6 failed=0)"
    until_mounts = messages[: messages.index(f"selftest mounts: {steps['mounts']['status']} {steps['mounts']['rest']}") + 1]
    assert first_broken(until_mounts) == "step cmdline: no result line"
    assert first_broken([]).startswith("the selftest never started")
    assert "script selftest exited with status 1" in messages and messages[-1] == "powering off"


def test_reading_the_kmsg_report() -> None:
    report = "selftest kmsg records=180 crng_init_done={} run_init={}"
    assert crng_problem([report.format(12, 150)]) is None
    assert "not ready before /init" in crng_problem([report.format(0, 150)])
    assert "not ready before /init" in crng_problem([report.format(151, 150)])
    assert "`Run /init as init process` not in" in crng_problem([report.format(12, 0)])
    assert crng_problem(guest_messages(real_console())).startswith("no `minivmm: selftest kmsg")
    assert crng_problem(["selftest kmsg: ok 1 2"]).startswith("no `minivmm: selftest kmsg")


def test_reading_an_interleaved_console() -> None:
    """A kernel-log record inside a tty line: each line's last message, each step's first copy."""
    console = real_console()
    fork_exec = next(line for line in console.splitlines() if line.startswith("minivmm: selftest fork-exec: "))
    sleep = next(line for line in console.splitlines() if line.startswith("minivmm: selftest sleep: "))
    mixed = interleave(console, fork_exec, sleep, len("minivmm: selftest fork-exec: ok n=5"))
    assert "n=5minivmm: selftest sleep" in mixed
    # the cut tty copy ends in the sleep record; its tail ("0 ms=...") carries no message
    expected = guest_messages(console)
    tty_copy = expected.index(fork_exec[len("minivmm: ") :]) + 1
    expected[tty_copy] = sleep[len("minivmm: ") :]
    assert guest_messages(mixed) == expected
    steps = selftest_steps(guest_messages(mixed))
    assert fields(steps["fork-exec"]) == FORK_EXEC_FIELDS  # the whole first copy, not the cut one
    assert fields(steps["sleep"])["ms"] == SLEEP_MS


# kvm_pvm intermittently hands a program started alongside another one (the two ends of a
# pipe) a freshly written page that reads back as zeros: glibc then faults before main
# (`wc[..]: segfault at 0 ip 4a4d02`, busybox's __ctype_init reading %fs:-0x90). The same
# kernel and initramfs crash the same way under QEMU on this host, so it is not minivmm's;
# sequential fork+exec never hits it. See guest/README.md.
PIPE_CRASH = "concurrently started programs intermittently crash before main on kvm_pvm (also under QEMU)"


@pytest.fixture(scope="module")
def selftest_probe(guest, tmp_path_factory) -> Probe:
    return run_probe(["--cmdline", CMDLINE], tmp_path_factory.mktemp("selftest"))


# What the selftest's pipe step reports when a run met that fault (guest/scripts/selftest.sh):
# wc killed by SIGSEGV, or nothing counted (ls died before main: a pipe hides its status).
PIPE_CRASH_RE = re.compile(r"^run \d+ of \d+: (wc killed by SIGSEGV \(status 139\)|wc counted 0, want \d+);")


@pytest.mark.boot
def test_pipes_between_concurrent_programs(selftest_probe: Probe) -> None:
    """`ls /bin | wc -l` ten times: the same count every time. On kvm_pvm only, a run whose
    failure is exactly the known crash (a program killed by SIGSEGV) is an expected failure;
    any other result fails."""
    steps = selftest_steps(guest_messages(selftest_probe.run.stdout))
    m = steps.get("pipe")
    assert m is not None, diagnosis(selftest_probe, "no pipe step result")
    if m["status"] != "ok" and SOFTWARE_KVM and PIPE_CRASH_RE.search(m["rest"]):
        pytest.xfail(f"{PIPE_CRASH}: {m['rest']}")
    assert m["status"] == "ok" and PIPE_OK_RE.match(m["rest"]), f"pipe: {m[0]}"


@pytest.mark.boot
def test_guest_user_space_works(selftest_probe: Probe, record_property) -> None:
    probe = selftest_probe
    run = probe.run
    record_property("boot_seconds", round(run.wall, 1))
    print(f"selftest boot took {run.wall:.1f} s (status {run.status}); `done` line seen after {probe.done_at} s")

    if probe.timed_out:
        pytest.fail(diagnosis(probe, f"the guest did not finish within {BOOT_TIMEOUT:g} s"), pytrace=False)
    if TRACEBACK in run.stderr:
        pytest.fail(diagnosis(probe, "minivmm raised an exception"), pytrace=False)

    # Every check below runs and reports; the message starts with the first broken step.
    problems: list[str] = []
    messages = guest_messages(run.stdout)
    broken = first_broken(messages, excused=("pipe",))
    if broken:
        problems.append(f"selftest: {broken}")
    pipe_failed = (m := selftest_steps(messages).get("pipe")) is not None and m["status"] != "ok"
    steps = selftest_steps(messages)
    figures: dict[str, float] = {}

    # 50 fork+exec+wait cycles, each a new program.
    if (m := steps.get("fork-exec")) and m["status"] == "ok":
        fe = fields(m)
        if not (int(fe["n"]) == FORK_EXEC_N and int(fe["pids"]) >= FORK_EXEC_N and fe["exec_comm"] == "cat" and fe["exit_status"] == "7"):
            problems.append(f"fork-exec: {m[0]}")
        figures["fork_exec_ms_per_cycle"] = round(int(fe["ms"]) / int(fe["n"]), 1)

    # `sleep 1` took 0.9..10 s of guest time (/proc/uptime), and the two readings agree with it.
    sleep_s = None
    if (m := steps.get("sleep")) and m["status"] == "ok":
        sl = fields(m)
        sleep_s = int(sl["ms"]) / 1000
        figures["sleep_1_guest_s"] = sleep_s
        lo, hi = SLEEP_RANGE_S
        if not lo <= sleep_s <= hi:
            problems.append(f"sleep 1 took {sleep_s} s of guest time, not {lo}..{hi}: {m[0]}")
        if abs(float(sl["uptime_after"]) - float(sl["uptime_before"]) - sleep_s) >= 0.02:
            problems.append(f"sleep: the uptime readings do not match ms=: {m[0]}")

    # Host time around the run is consistent with the guest's: not instant (the host waited at
    # least the guest's sleep, and about as long as the guest's clock ran up to the `done` line,
    # give or take the VMM's start-up), not hung (it finished: see the timeout above).
    done = next((d for t in messages if (d := DONE_RE.match(t))), None)
    if sleep_s is not None and run.wall < sleep_s:
        problems.append(f"the whole run took {run.wall:.1f} s of host time, less than the guest's {sleep_s} s sleep")
    if done is not None:
        guest_uptime = float(done["uptime"])
        figures["guest_uptime_at_done_s"] = guest_uptime
        if probe.done_at is None:
            problems.append("the `done` line was never seen while the run went on")
        else:
            figures["host_s_to_done"] = round(probe.done_at, 1)
            if guest_uptime > probe.done_at + 2.0:
                problems.append(f"guest clock ran fast: uptime {guest_uptime} s at `done`, which the host saw {probe.done_at:.1f} s after the spawn")
            if guest_uptime < probe.done_at / 4:
                problems.append(f"guest clock ran slow: uptime {guest_uptime} s at `done`, which the host saw {probe.done_at:.1f} s after the spawn")

    # The RNG seed (setup_data SETUP_RNG_SEED, CONFIG_RANDOM_TRUST_BOOTLOADER) made the CRNG
    # ready before user space: "random: crng init done" precedes "Run /init" in the kernel log.
    if crng := crng_problem(messages):
        problems.append(crng)

    # The tty: the guest's writes to /dev/console and /dev/ttyS0 reached the host.
    for check in TTY_CHECKS:
        if check not in run.stdout:
            problems.append(f"{check!r}, written by the guest, never reached the host console")
    if (m := steps.get("tty")) and fields(m).get("irq") == "0":
        problems.append(
            "ttyS0 works only in polled mode (irq=0): the 8250 driver could not get the UART's interrupt and "
            "/init fell back to polling (is COM1 still described in the DSDT? see guest/README.md)"
        )

    # The end: the script's status, /init's poweroff, ACPI S5, status 0.
    if f"script selftest exited with status {int(pipe_failed)}" not in messages:
        exited = [t for t in messages if t.startswith("script selftest exited")]
        problems.append(f"the selftest script's exit: {exited[0] if exited else 'never reported'}")
    if "powering off" not in messages[messages.index(done[0]) if done else 0 :]:
        problems.append("no `minivmm: powering off` after the selftest")
    last_err = run.stderr.rstrip("\n").splitlines()[-1] if run.stderr.strip() else ""
    if run.status != 0 or last_err != "minivmm: guest powered off (ACPI S5)":
        problems.append(f"the run ended with status {run.status}: {last_err!r} (want 0 and 'minivmm: guest powered off (ACPI S5)')")

    # Emulation fallbacks (--stats-json): kvm_pvm fails `fwait` in fpu__drop(), which every exiting
    # task runs, so 50 short-lived programs mean at least 50; real KVM never needs one.
    if run.stats is None:
        problems.append("minivmm wrote no --stats-json")
    counts = run.stats.fallbacks if run.stats else {}
    figures["fallback_fwait"] = counts.get("fwait", 0)
    if SOFTWARE_KVM and counts.get("fwait", 0) < FORK_EXEC_N:
        problems.append(f"kvm_pvm host, but emulation fallbacks {counts} (want fwait >= {FORK_EXEC_N})")
    if not SOFTWARE_KVM and any(counts.values()):
        problems.append(f"emulation fallbacks on a hardware-KVM host: {counts}")

    for name, value in figures.items():
        record_property(name, value)
    print(f"figures: {figures}; fallbacks {counts}")
    if problems:  # the message is the report; the test's source would only hide it
        pytest.fail(diagnosis(probe, "\n".join(problems)), pytrace=False)
