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
