"""Error classes whose message is shown to the user as one line, without a traceback."""

import sys
from typing import Callable


class MinivmmError(Exception):
    """Base class: ``str(err)`` is the one line shown to the user."""

    exit_status = 1


class UserError(MinivmmError):
    """Something the user can fix: a bad option, a missing or malformed file (exit status 2)."""

    exit_status = 2


class HostError(MinivmmError):
    """The host cannot run the VM: no /dev/kvm, no permission, a missing capability (exit status 1)."""

    exit_status = 1


class GuestMemoryError(Exception):
    """A guest-physical access outside guest memory; raised by a guest-controlled value, never fatal to the VMM."""


def report_thread_error(where: str, exc: BaseException, errors: list[BaseException]) -> None:
    """An unexpected exception on a VMM thread (event loop, a device's thread): keep it in
    `errors` (statistics count them) and say it on stderr at once, in one line."""
    errors.append(exc)
    print(f"minivmm: {where} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def run_command(body: Callable[[], int]) -> int:
    """Run a command's body; a `MinivmmError` becomes one line on stderr and its exit status."""
    try:
        return body()
    except MinivmmError as exc:
        print(f"minivmm: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("minivmm: interrupted", file=sys.stderr)
        return 130
