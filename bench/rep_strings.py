"""How fast this host's KVM runs the kernel's bulk-copy instructions in guest ring 0.

Fills 2 MiB of guest RAM three ways in a hand-assembled long-mode guest (`minivmm.api.BareVm`)
and prints the median wall time of each over --runs runs:

* `rep stosb`: what Linux's memset/clear_page use when the CPU has ERMS (and memcpy's
  `rep movsb` with ERMS/FSRM);
* `rep stosq`: what they use without ERMS (X86_FEATURE_REP_GOOD), 8 bytes a step;
* a `movnti` loop, 32 bytes an iteration: memcpy_flushcache, the pmem driver's copy.

On a software KVM that emulates guest kernel code one instruction (or one string-instruction
step) at a time, the time follows the number of steps; on hardware KVM all three run at memory
speed. README "Running on software-KVM hosts" quotes this script's output for the `erms,fsrm`
remedy.

    PYTHONPATH=. .venv/bin/python bench/rep_strings.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import time

from minivmm.api import BareVm

FILL = 2 << 20
BUFFER = 0x200000
CODE = 0x10000
START, END = 0xE0, 0xE1  # ports the guest writes before and after the fill


def imm64(value: int) -> str:
    return value.to_bytes(8, "little").hex()


def fill_code(kind: str) -> bytes:
    """mov rdi, BUFFER; out START; <fill FILL bytes with zeros>; out END"""
    code = "48 bf" + imm64(BUFFER) + f"e6 {START:02x}" + "31 c0"  # mov rdi, BUFFER; out; xor eax, eax
    if kind == "rep stosb":
        code += "48 b9" + imm64(FILL) + "f3 aa"  # mov rcx, FILL; rep stosb
    elif kind == "rep stosq":
        code += "48 b9" + imm64(FILL // 8) + "f3 48 ab"  # mov rcx, FILL/8; rep stosq
    else:  # movnti loop: 4 x movnti [rdi+n], rax; add rdi, 32; dec rcx; jnz
        body = "48 0f c3 07 48 0f c3 47 08 48 0f c3 47 10 48 0f c3 47 18 48 83 c7 20 48 ff c9"
        back = -(len(bytes.fromhex(body)) + 2) & 0xFF
        code += "48 b9" + imm64(FILL // 32) + body + f"75 {back:02x}"
    return bytes.fromhex(code + f"e6 {END:02x}")


class Stopwatch:
    """Port device: the time of the guest's START and END writes; END stops the VM."""

    def __init__(self, vm: BareVm) -> None:
        self.vm, self.at = vm, {}

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.at[offset] = time.perf_counter()
        if offset == END - START:
            self.vm.stop(0, "fill done")


def time_fill(kind: str) -> float:
    with BareVm(8 << 20, irqchip=False) as vm:
        watch = Stopwatch(vm)
        vm.load(CODE, fill_code(kind))
        vm.add_port_device(START, 2, watch)
        vm.start_long_mode(CODE)
        vm.run(timeout=600)
        return watch.at[END - START] - watch.at[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be at least 1")
    for kind in ("rep stosb", "rep stosq", "movnti loop"):
        times = [time_fill(kind) for _ in range(args.runs)]
        print(f"{kind:12} 2 MiB: median {statistics.median(times) * 1e3:8.1f} ms  (runs: {', '.join(f'{t * 1e3:.1f}' for t in times)})")


if __name__ == "__main__":
    main()
