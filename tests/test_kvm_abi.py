"""The cffi layouts in `minivmm.kvm` against the kernel's own headers.

Every struct that is mmapped (`kvm_run`) or passed to an ioctl is compiled by the host C
compiler against <linux/kvm.h>; each field's offset and size, recursively through nested
structs and unions, and each struct's size must equal the cffi layout's. A mismatch would
corrupt the ioctl silently or read the wrong exit field, so this is a fast test on every host.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from minivmm.kvm import ffi

# Every struct minivmm hands to the kernel or maps from it.
STRUCTS = (
    "kvm_run",
    "kvm_vcpu_events",
    "kvm_regs",
    "kvm_sregs",
    "kvm_segment",
    "kvm_dtable",
    "kvm_fpu",
    "kvm_userspace_memory_region",
    "kvm_dirty_log",
    "kvm_msr_entry",
    "kvm_msrs",
    "kvm_cpuid_entry2",
    "kvm_cpuid2",
    "kvm_pit_config",
    "kvm_irq_level",
    "kvm_irq_routing_entry",
    "kvm_irq_routing",
    "kvm_irqfd",
    "kvm_ioeventfd",
    "kvm_translation",
    "kvm_lapic_state",
    "kvm_mp_state",
)


def cffi_fields(ctype, prefix: str = "", base: int = 0):
    """(dotted path, offset, size) of every field, descending into nested structs and unions."""
    for name, field in ctype.fields:
        path = f"{prefix}{name}"
        offset = base + field.offset
        size = ffi.sizeof(field.type) if field.type.kind != "array" or field.type.length is not None else 0
        yield path, offset, size
        if field.type.kind in ("struct", "union"):
            yield from cffi_fields(field.type, f"{path}.", offset)


def layout_rows() -> list[tuple[str, str, int, int]]:
    rows = []
    for struct in STRUCTS:
        ctype = ffi.typeof(f"struct {struct}")
        rows.append((struct, "", 0, ffi.sizeof(ctype)))
        rows += [(struct, path, off, size) for path, off, size in cffi_fields(ctype)]
    return rows


@pytest.fixture(scope="module")
def kernel_layout(tmp_path_factory) -> dict[tuple[str, str], tuple[int, int]]:
    """The same rows, measured by the C compiler on <linux/kvm.h>."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed (build-essential is installed by `make deps`)"
    assert Path("/usr/include/linux/kvm.h").exists(), "linux-libc-dev is needed for <linux/kvm.h>"
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for struct, path, _, size in layout_rows():
        t = f"struct {struct}"
        if not path:
            lines.append(f'printf("{struct} - 0 %zu\\n", sizeof({t}));')
        elif size:
            lines.append(f'printf("{struct} {path} %zu %zu\\n", offsetof({t}, {path}), sizeof((({t} *)0)->{path}));')
        else:  # a flexible array member: offset only
            lines.append(f'printf("{struct} {path} %zu 0\\n", offsetof({t}, {path}));')
    lines.append("return 0; }")
    tmp = tmp_path_factory.mktemp("kvmabi")
    src, exe = tmp / "layout.c", tmp / "layout"
    src.write_text("\n".join(lines))
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    table = {}
    for line in out.splitlines():
        struct, path, off, size = line.split()
        table[(struct, "" if path == "-" else path)] = (int(off), int(size))
    return table


@pytest.mark.parametrize("struct", STRUCTS)
def test_cffi_layout_matches_the_kernel_headers(kernel_layout, struct: str) -> None:
    rows = [r for r in layout_rows() if r[0] == struct]
    assert len(rows) > 1, f"struct {struct} has no fields in the cdef"
    for _, path, off, size in rows:
        assert kernel_layout[(struct, path)] == (off, size), f"struct {struct} {path or 'sizeof'}"


def test_the_union_members_minivmm_reads_are_checked() -> None:
    """The walk reaches the exit fields the exit decoder reads (it would miss a renamed one)."""
    paths = {path for s, path, _, _ in layout_rows() if s == "kvm_run"}
    for needed in ("exit_reason", "immediate_exit", "io.data_offset", "mmio.is_write", "mmio.data",
                   "internal.data", "system_event.type", "fail_entry.cpu"):  # fmt: skip
        assert needed in paths
