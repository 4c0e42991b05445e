"""The `minivmm` command line: `minivmm run ...` boots a guest; `minivmm guest build` builds the default one.

Errors a user can cause print one line (`minivmm: error: ...`) and exit with status 2;
a host without a usable KVM exits with status 1; neither prints a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from . import __version__
from .errors import UserError, run_command
from .profiler import DEFAULT_HZ as DEFAULT_PROFILE_HZ
from .units import format_size, parse_size
from . import layout
from .devices.pci_hotplug import HOTPLUG_SLOTS
from .layout import MAX_VCPUS

DEFAULT_CMDLINE = "console=ttyS0 quiet panic=-1 reboot=k"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of argparse's usage block (the user can ask for --help).
        self.exit(2, f"{self.prog}: error: {message}\n")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cpus(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_VCPUS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of vCPUs from 1 to {MAX_VCPUS}")
    return n


def _hotplug_slots(text: str) -> int:
    n = int(text) if text.isascii() and text.isdigit() else -1
    if not 0 <= n <= MAX_HOTPLUG_SLOTS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of PCI slots from 0 to {MAX_HOTPLUG_SLOTS}")
    return n


MAX_HOTPLUG_SLOTS = len(HOTPLUG_SLOTS)  # bus 0's slots 1-31 (slot 0 is the host bridge)


# --boot: the values of `boot.BOOT_CHOICES`, the default first (spelled out so that the
# parser does not import the loaders).
BOOT_OPTIONS = ["linux", "pvh"]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minivmm", description="A miniature x86-64 virtual machine monitor on KVM.")
    parser.add_argument("--version", action="version", version=f"minivmm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="boot a guest", description="Boot a Linux guest on KVM.")
    run.add_argument(
        "--kernel", type=Path,
        help="vmlinux (ELF) or bzImage, booted as given; default: the built default guest's uniprocessor kernel "
        "for --cpus 1, its SMP kernel for --cpus 2 and more",
    )
    run.add_argument("--initrd", type=Path, help="initramfs/initrd image; default: the default guest's, when --kernel is not given")
    run.add_argument("--cmdline", "--append", dest="cmdline", help=f"kernel command line (default: {DEFAULT_CMDLINE!r})")
    run.add_argument(
        "--boot",
        choices=BOOT_OPTIONS,
        default=BOOT_OPTIONS[0],
        help="how a vmlinux is entered: linux (64-bit boot protocol, boot_params with an RNG seed) or pvh "
        "(its Xen PVH entry note); a bzImage boots with linux only (default: linux)",
    )
    run.add_argument(
        "--mem",
        type=_size,
        metavar="SIZE",
        help=f"guest RAM, K/M/G suffixes (default {format_size(layout.DEFAULT_MEM_SIZE)}, or 4x the page structures "
        "of the --pmem devices given at start if that is more: 256M for 4G of pmem)",
    )
    run.add_argument(
        "--hotplug-slots",
        type=_hotplug_slots,
        default=layout.PCI_HOTPLUG_SLOTS_DEFAULT,
        metavar="N",
        help=f"free PCI slots the guest gets ACPI hotplug objects for, i.e. how many devices can be "
        f"hot-added, 0 to {MAX_HOTPLUG_SLOTS} (default {layout.PCI_HOTPLUG_SLOTS_DEFAULT}; each costs boot time)",
    )
    run.add_argument("--cpus", type=_cpus, default=1, metavar="N", help=f"number of vCPUs, 1 to {MAX_VCPUS} (default 1)")
    run.add_argument(
        "--pmem",
        action="append",
        default=[],
        metavar="PATH[,size=SIZE][,id=ID][,discard-writes=on][,prealloc=on][,lose-unflushed=on[,flush-log=FILE]]",
        help="add a virtio-pmem-pci device backed by PATH (repeatable: /dev/pmem0, /dev/pmem1, ...); "
        "prealloc=on allocates the whole file at start, so a full disk is a start-up error",
    )
    run.add_argument("--qmp", "-qmp", metavar="PATH", help="serve QMP on a UNIX socket (also QEMU's unix:PATH,server=on,wait=off)")
    run.add_argument(
        "--object", "-object", action="append", default=[], metavar="memory-backend-file,id=ID,mem-path=PATH[,size=SIZE][,share=on]",
        help="a memory backend, as QEMU's -object (repeatable)",
    )
    run.add_argument(
        "--device", "-device", action="append", default=[], metavar="virtio-pmem-pci,memdev=ID[,id=ID]",
        help="a virtio-pmem-pci device on a --object backend, as QEMU's -device (repeatable)",
    )
    run.add_argument(
        "--trace", nargs="?", const="", default=None, metavar="LIST",
        help="print every exit to userspace, in words, on stderr; --trace=LIST only those whose kind (io, mmio, "
        "emulation-fallback) or device (serial, pci, virtio, pmem0, acpi-sleep, unclaimed, ...) LIST names, comma-separated",
    )
    run.add_argument("--stats", action="store_true", help="print exit counts and time inside/outside KVM_RUN at exit")
    run.add_argument(
        "--stats-json",
        type=Path,
        metavar="FILE",
        help="write the same statistics as JSON to FILE at exit (with --trace: every exit too)",
    )
    run.add_argument(
        "--timeline", type=Path, metavar="FILE",
        help="write an SVG picture of the run to FILE at exit: exits per 100 ms by kind and device, time in/out of "
        "KVM_RUN, emulation fallbacks, pmem flushes, guest console milestones",
    )
    run.add_argument(
        "--profile", nargs="?", const=str(DEFAULT_PROFILE_HZ), default=None, metavar="HZ",
        help=f"sample the guest's instruction pointer HZ times a second (default {DEFAULT_PROFILE_HZ}) and print the "
        "top guest functions, kernel vs user share and the sampling cost on stderr at exit (also in --stats-json)",
    )
    run.add_argument(
        "--profile-map", type=Path, metavar="SYSTEM_MAP",
        help="name --profile's functions from this System.map (or /proc/kallsyms copy); default: the kernel's ELF "
        "symbols, or the default guest's System.map for its bzImage",
    )
    run.add_argument("--watchdog", type=float, metavar="SECONDS", help="dump vCPU state and stop if the guest makes no progress for this long")
    guest = sub.add_parser(
        "guest",
        help="build or locate the default guest",
        description="The default guest kernel and initramfs. build (in a minivmm checkout): build what is missing and "
        "record it in the manifest that `minivmm run` reads; paths: print what the manifest names; "
        "prune: delete other cached builds.",
    )
    guest.add_argument("action", choices=["build", "paths", "prune"])
    guest.add_argument("--force", action="store_true", help="build: rebuild even what is cached")
    pmem = sub.add_parser("pmem", help="pmem tools", description="Tools for pmem images (see README, Power-failure simulation).")
    pmem_sub = pmem.add_subparsers(dest="pmem_command", required=True, parser_class=_Parser)
    replay = pmem_sub.add_parser(
        "replay", help="rebuild an image at a flush point of a flush log",
        description="Apply a --pmem ...,flush-log=FILE log to IMAGE, a copy of the image as the run started, "
        "up to flush (epoch) N; or --list the epochs with their page counts.",
    )  # fmt: skip
    replay.add_argument("log", metavar="LOG")
    replay.add_argument("image", metavar="IMAGE", nargs="?")
    replay.add_argument("--upto", type=int, metavar="N", help="last epoch to apply (default: every whole record)")
    replay.add_argument("--list", action="store_true", help="list the epochs and their page counts")
    return parser


def _default_guest(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """--kernel/--initrd, else the default guest that the manifest of the last build names,
    with the kernel built for --cpus (`GuestManifest.boot_kernel`)."""
    from .guestmanifest import default_guest

    if args.kernel is not None:
        return args.kernel, args.initrd
    guest = default_guest()
    return guest.boot_kernel(args.cpus), args.initrd or guest.initrd


def cmd_run(args: argparse.Namespace) -> int:
    from .boot import BootProtocol
    from .machine import Machine, MachineConfig, check_kernel
    from .monitor.objects import specs_from_command_line
    from .monitor.qmp import parse_qmp_path
    from .pmemfile import check_plan, parse_pmem_option, planned_sizes

    profile_hz = _profile_hz(args)  # the options first: no guest is looked for when they are wrong
    kernel, initrd = _default_guest(args)
    for what, path in (("kernel", kernel), ("initrd", initrd)):
        if path is not None:
            _check_input_file(what, path)
    if args.watchdog is not None and not (math.isfinite(args.watchdog) and args.watchdog > 0):
        raise UserError("--watchdog must be a positive number of seconds")
    for option, path in (("--stats-json", args.stats_json), ("--timeline", args.timeline)):
        if path is not None:
            _check_writable(option, path)  # fails before the guest boots, and leaves the file alone
    pmem = [parse_pmem_option(text) for text in args.pmem] + specs_from_command_line(args.object, args.device)
    config = MachineConfig(
        kernel=kernel,
        initrd=initrd,
        cmdline=args.cmdline if args.cmdline is not None else DEFAULT_CMDLINE,
        boot=BootProtocol(args.boot),
        mem_size=args.mem if args.mem is not None else layout.default_mem_size(planned_sizes(pmem)),
        cpus=args.cpus,
        hotplug_slots=args.hotplug_slots,
        trace=args.trace is not None,
        trace_only=_trace_list(args.trace),
        watchdog=args.watchdog,
        pmem=pmem,
        qmp=parse_qmp_path(args.qmp) if args.qmp is not None else None,
        timeline=args.timeline is not None,
        profile_hz=profile_hz,
        profile_map=args.profile_map,
    )
    # What the user may have got wrong, in the order a machine would find it, before any
    # --pmem file is created or changed: the memory plan, then the kernel.
    check_plan(config.pmem, config.mem_size)
    check_kernel(config.kernel, config.mem_size, config.boot)
    with Machine(config) as machine:
        try:
            stop = machine.run()
        finally:
            stats = machine.statistics()  # also when the run failed (the JSON then has no stop)
            if args.stats:
                print(stats.render_text(), file=sys.stderr)
            if stats.profile is not None:
                print(stats.profile.render_text(), file=sys.stderr)
            if args.stats_json is not None:
                _write_stats_json(args.stats_json, stats.to_json())
            if args.timeline is not None:
                from .timeline import from_machine, render_svg

                _write_file("--timeline", args.timeline, render_svg(from_machine(machine)))
    print(f"minivmm: {stop.reason}", file=sys.stderr)
    return stop.status


def _profile_hz(args: argparse.Namespace) -> int | None:
    """--profile[=HZ] checked (None: no profiling); --profile-map only with it, and readable."""
    from .profiler import parse_hz

    if args.profile is None:
        if args.profile_map is not None:
            raise UserError("--profile-map names the functions of a --profile: give --profile too")
        return None
    hz = parse_hz(args.profile)
    if args.profile_map is not None:
        _check_input_file("--profile-map", args.profile_map)
    return hz


def _check_input_file(what: str, path: Path) -> None:
    """UserError unless `path` is a regular file (not a directory, device or pipe)."""
    if not path.exists():
        raise UserError(f"{what} {path}: no such file")
    if not path.is_file():
        raise UserError(f"{what} {path}: not a regular file")


def _trace_list(text: str | None) -> frozenset[str]:
    """--trace=LIST as a set of lower-case names (empty: trace everything)."""
    if not text:
        return frozenset()
    names = [n.strip().lower() for n in text.split(",")]
    if not all(names):
        raise UserError(f"--trace={text}: an empty name in the list")
    return frozenset(names)


def _write_stats_json(path: Path, text: str) -> None:
    _write_file("--stats-json", path, text)


def _check_writable(option: str, path: Path) -> None:
    """UserError unless `path` is a regular file we may write, or can be created: checked
    without creating, truncating or touching it (a later user error must leave it as it was)."""
    if path.exists():
        if path.is_dir():
            raise UserError(f"{option} {path}: Is a directory")
        if not os.access(path, os.W_OK):  # a file, or a pipe or terminal such as /dev/stdout
            raise UserError(f"{option} {path}: Permission denied")
        return
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{option} {path}: No such file or directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: Permission denied")


def _write_file(option: str, path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{option} {path}: {exc.strerror}") from None


def cmd_guest(args: argparse.Namespace) -> int:
    """`minivmm guest build|paths|prune`; `python -m minivmm.guestimage` comes here too."""
    if args.action == "paths":
        from .guestmanifest import default_guest

        print(default_guest().describe())
        return 0
    from . import guestimage

    if args.action == "build":
        print(guestimage.build(force=args.force).describe())
    else:
        for path in guestimage.prune():
            print(f"removed {path}")
    return 0


def cmd_pmem(args: argparse.Namespace) -> int:
    """`minivmm pmem replay LOG IMAGE [--upto N]` / `minivmm pmem replay LOG --list` (minivmm.flushlog)."""
    from . import flushlog

    def warn(line: str) -> None:
        print(f"minivmm: warning: {line}", file=sys.stderr)

    if args.list:
        if args.image is not None or args.upto is not None:
            raise UserError("pmem replay --list takes only the LOG")
        for epoch, pages in flushlog.list_epochs(args.log, warn):
            print(f"epoch {epoch}: {pages} page(s)")
        return 0
    if args.image is None:
        raise UserError("pmem replay: give the IMAGE to rebuild (a copy of the starting image), or --list")
    if args.upto is not None and args.upto < 0:
        raise UserError("pmem replay: --upto must be an epoch number >= 0")
    applied = flushlog.replay(args.log, args.image, args.upto, warn)
    print(f"{args.image}: as after flush {applied}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: {"run": cmd_run, "guest": cmd_guest, "pmem": cmd_pmem}[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
