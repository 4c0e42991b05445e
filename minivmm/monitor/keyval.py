"""QEMU's ``key=value,...`` option syntax (``-object``, ``-device``, HMP ``object_add``).

``memory-backend-file,id=mem1,share=on,mem-path=disk.img,size=4G``: the first element may
omit its key (the *implied key*: ``qom-type`` for objects, ``driver`` for devices); a comma
inside a value is written twice (``,,``), as in QEMU's QemuOpts. Values stay strings here;
`typed` converts them to an argument table's types (size suffixes, on/off booleans), so the
command line, HMP and QMP's JSON arguments end in the same shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UserError
from ..units import parse_size

_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
BOOLEANS = {"on": True, "yes": True, "true": True, "y": True, "off": False, "no": False, "false": False, "n": False}


def split_options(text: str) -> list[str]:
    """Split at single commas; ``,,`` stands for a literal comma."""
    parts, current, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, str]:
    """``a,b=1,c=x,,y`` -> {implied_key: "a", "b": "1", "c": "x,y"}; `UserError` on a key
    given twice, an empty key, or an element without ``=`` other than the first."""
    if not text:
        raise UserError("empty option string")
    out: dict[str, str] = {}
    for n, part in enumerate(split_options(text)):
        key, eq, value = part.partition("=")
        if not eq:
            if n == 0 and implied_key is not None:
                key, value = implied_key, part
            else:
                raise UserError(f"{text!r}: expected key=value, got {part!r}")
        if not _KEY_RE.fullmatch(key):
            raise UserError(f"{text!r}: bad parameter name {key!r}")
        if key in out:
            raise UserError(f"{text!r}: parameter {key!r} given twice")
        out[key] = value
    return out


@dataclass(frozen=True)
class Param:
    """One argument of a command: its QMP name, type and whether it may be left out.

    Types are QAPI's: ``str``, ``int``, ``size`` (bytes; K/M/G/T suffixes from text),
    ``bool`` (on/off from text), ``any`` (passed as given)."""

    name: str
    type: str = "str"
    optional: bool = False


def from_text(param: Param, text: str) -> object:
    """A keyval string converted to `param`'s type (UserError naming the parameter)."""
    if param.type == "size":
        try:
            return parse_size(text)
        except UserError:
            raise UserError(f"Parameter '{param.name}' expects a size (bytes, with an optional K, M, G or T suffix)") from None
    if param.type == "int":
        try:
            return int(text, 0)
        except ValueError:
            raise UserError(f"Parameter '{param.name}' expects an integer") from None
    if param.type == "bool":
        if text.lower() not in BOOLEANS:
            raise UserError(f"Parameter '{param.name}' expects 'on' or 'off'")
        return BOOLEANS[text.lower()]
    return text


def typed(params: tuple[Param, ...], values: dict[str, str]) -> dict[str, object]:
    """Keyval strings -> typed arguments; unknown keys are kept as strings for the command
    to refuse with its own message."""
    by_name = {p.name: p for p in params}
    return {k: from_text(by_name[k], v) if k in by_name else v for k, v in values.items()}
