"""hostcheck: the software-KVM command-line remedy (no KVM needed)."""

from __future__ import annotations

from pathlib import Path

from minivmm import hostcheck

# arch/x86/kernel/cpu/common.c, cpu_parse_early_param(): `char arg[128]` holds clearcpuid's
# value; a longer one is cut and the features past the cut stay visible.
CLEARCPUID_ARG_MAX = 127


def test_clearcpuid_fits_the_kernels_buffer() -> None:
    params = hostcheck.SOFTWARE_KVM_CMDLINE.split()
    clear = [p for p in params if p.startswith("clearcpuid=")]
    assert clear == [hostcheck.CLEARCPUID]
    name, _, value = clear[0].partition("=")
    assert len(value) <= CLEARCPUID_ARG_MAX
    features = value.split(",")
    assert len(features) == len(set(features))
    # The string features: rep movsb/stosb would run one byte per emulated iteration.
    assert {"erms", "fsrm"} <= set(features) and "rep_good" not in features


def test_probe(tmp_path: Path) -> None:
    assert not hostcheck.probe(tmp_path).software_kvm
    (tmp_path / "kvm_pvm").mkdir()
    host = hostcheck.probe(tmp_path)
    assert host.software_kvm and host.module == "kvm_pvm" and "clearcpuid=" in (host.notice or "")


def test_boot_params_are_kernel_parameters() -> None:
    # Each remedy is one `name` or `name=value` token the kernel parses (no spaces, no quoting),
    # and none is repeated or also in the clearcpuid token.
    params = hostcheck.SOFTWARE_KVM_CMDLINE.split()
    assert params == [hostcheck.CLEARCPUID, *hostcheck.SOFTWARE_KVM_BOOT_PARAMS]
    assert len(params) == len(set(params))
    assert "noreplace-smp" in params and "percpu_alloc=page" in params


def test_smp_only_params_go_to_smp_kernels_only() -> None:
    assert hostcheck.software_kvm_cmdline(smp_kernel=False) == hostcheck.CLEARCPUID
    assert hostcheck.software_kvm_cmdline(smp_kernel=True) == hostcheck.SOFTWARE_KVM_CMDLINE
