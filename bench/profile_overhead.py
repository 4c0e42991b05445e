#!/usr/bin/env python3
"""What `minivmm run --profile` costs the guest: runs with and without it, medians.

Two measurements. (1) A fixed amount of guest kernel work: the tiny kernel of the profiler's
tests (tests/support/spin_kernel.py) counting down SPIN_LOOPS iterations in ring 0, run
`--synthetic-runs` times each way; the difference of the medians divided by the samples
taken is the cost of one sample to the guest (exit, register read, re-entry). (2) Each round
boots the default guest twice (order alternating, so a load trend on this shared
machine hits both alike), once plain and once with `--profile=HZ`, with the test init's
`hello` step and a power-off (bench.py's boot command line). Prints, per variant, the medians
of the time to the init's first console line, of the whole run, and of the guest's time in
KVM_RUN; then the profiled runs' own account of their cost (samples x time per sample on the
vCPU thread, from --stats-json). Usage: `bench/profile_overhead.py [--runs N] [--hz HZ] [--json FILE]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the runner the boot tests and bench.py use

from support.runner import RunResult, run_minivmm  # noqa: E402
from support.spin_kernel import spin_elf, spin_loops  # noqa: E402

from minivmm.profiler import DEFAULT_HZ  # noqa: E402

CMDLINE = "console=ttyS0 panic=-1 reboot=k rdinit=/sbin/minivmm-test minivmm.steps=hello minivmm.end=poweroff"
HELLO = "minivmm-test: hello"
TIMEOUT = 1200.0
SPIN_LOOPS = 3_000_000  # dec/jnz iterations in ring 0: ~7 s on kvm_pvm (emulated), milliseconds on hardware KVM


def boot(workdir: Path, profile_hz: int | None) -> dict:
    """One boot; its figures (seconds), or a SystemExit naming what went wrong."""
    args = ["--cmdline", CMDLINE] + ([f"--profile={profile_hz}"] if profile_hz else [])
    run: RunResult = run_minivmm(args, workdir, timeout=TIMEOUT, markers=[HELLO])
    if run.status != 0 or run.stats is None or HELLO not in run.marks:
        raise SystemExit(f"boot failed:\n{run.describe()}")
    figures = {
        "hello_s": run.marks[HELLO],
        "wall_s": run.wall,
        "in_kvm_run_s": sum(v.time_in_run for v in run.stats.vcpus),
    }
    if (p := run.stats.profile) is not None:
        figures |= {"samples": p.samples, "handling_s": p.handling, "cost_per_sample_us": p.cost_per_sample * 1e6,
                    "mean_latency_us": p.mean_latency * 1e6}
    return figures


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def synthetic(workdir: Path, runs: int, hz: int, loops: int) -> dict:
    """Run the fixed-work tiny kernel `runs` times each way (alternating); the medians and the
    cost per sample they imply."""
    kernel = workdir / "spin.elf"
    workdir.mkdir(parents=True, exist_ok=True)
    kernel.write_bytes(spin_elf(spin_loops(loops), spin_loops(1)))
    walls: dict[str, list[float]] = {"plain": [], "profiled": []}
    samples: list[int] = []
    for i in range(runs):
        for profiled in ([False, True] if i % 2 == 0 else [True, False]):
            args = ["--kernel", str(kernel)] + ([f"--profile={hz}"] if profiled else [])
            run = run_minivmm(args, workdir / f"spin-{i}-{profiled}", timeout=TIMEOUT)
            if run.status != 0 or run.stats is None:
                raise SystemExit(f"tiny kernel run failed:\n{run.describe()}")
            walls["profiled" if profiled else "plain"].append(run.wall)
            if run.stats.profile is not None:
                samples.append(run.stats.profile.samples)
    plain, profiled = statistics.median(walls["plain"]), statistics.median(walls["profiled"])
    n = statistics.median(samples)
    print(f"profile overhead, {loops} iterations of guest kernel work (tiny kernel), medians of {runs} (--profile={hz})")
    print(f"  whole run: plain {plain:.3f} s, profiled {profiled:.3f} s ({100 * (profiled - plain) / plain:+.1f} %), "
          f"{n:.0f} samples: {(profiled - plain) / n * 1e6 if n else 0:.0f} µs per sample")
    return {"plain_s": walls["plain"], "profiled_s": walls["profiled"], "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="default-guest boots per variant (default 3; 0: none)")
    parser.add_argument("--hz", type=int, default=DEFAULT_HZ, help=f"--profile rate (default {DEFAULT_HZ})")
    parser.add_argument("--synthetic-runs", type=int, default=5, help="tiny-kernel runs per variant (default 5)")
    parser.add_argument("--spin-loops", type=int, default=SPIN_LOOPS, help=f"tiny kernel's work (default {SPIN_LOOPS})")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args(argv)
    results: dict = {"plain": [], "profiled": []}
    with tempfile.TemporaryDirectory(prefix="minivmm-profile-bench-") as tmp:
        if args.synthetic_runs:
            results["synthetic"] = synthetic(Path(tmp) / "synthetic", args.synthetic_runs, args.hz, args.spin_loops)
        for i in range(args.runs):
            order = [None, args.hz] if i % 2 == 0 else [args.hz, None]
            for hz in order:
                name = "profiled" if hz else "plain"
                figures = boot(Path(tmp) / f"{name}-{i}", hz)
                results[name].append(figures)
                print(f"run {i + 1} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()), file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    plain, profiled = results["plain"], results["profiled"]
    if not plain:
        return 0
    print(f"profile overhead, default guest boot to power-off, medians of {args.runs} (--profile={args.hz})")
    for key, title in (("hello_s", "process start -> init's first line"), ("wall_s", "whole run"), ("in_kvm_run_s", "time in KVM_RUN")):
        a, b = median(plain, key), median(profiled, key)
        print(f"  {title:<36} plain {a:8.2f} s  profiled {b:8.2f} s  ({100 * (b - a) / a:+.1f} %)")
    samples = median(profiled, "samples")
    print(f"  profiler's own account: {samples:.0f} samples x {median(profiled, 'cost_per_sample_us'):.1f} µs on the vCPU "
          f"thread = {median(profiled, 'handling_s'):.3f} s; kick to sample {median(profiled, 'mean_latency_us'):.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
