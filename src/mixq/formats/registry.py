"""Format registry: a format family registers a name prefix and a parser.

A format name is ``PREFIX BITS [-TOKEN ...]``, e.g. ``int4-g128``, ``fp8-e4m3``,
``nf4-g64``, ``mxfp4``.  ``parse_format(f.name) == f`` for every format.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from mixq.errors import FormatError
from mixq.formats.base import Format

Parser = Callable[[int, list[str]], Format]

_FAMILIES: dict[str, tuple[Parser, str]] = {}
_NAME = re.compile(r"^([a-z]+?)(\d+)((?:-[a-z0-9.]+)*)$")


def register_family(prefix: str, help_text: str) -> Callable[[Parser], Parser]:
    """Register the parser of names that start with ``prefix`` followed by the bit width."""

    def deco(parser: Parser) -> Parser:
        if prefix in _FAMILIES:
            raise ValueError(f"format family {prefix!r} registered twice")
        _FAMILIES[prefix] = (parser, help_text)
        return parser

    return deco


def families() -> dict[str, str]:
    """Prefix -> one-line description, for ``mixq formats``."""
    return {k: v[1] for k, v in sorted(_FAMILIES.items())}


def parse_format(name: str | Format) -> Format:
    """Parse a format name (case-insensitive); a Format passes through."""
    if isinstance(name, Format):
        return name
    text = str(name).strip().lower()
    m = _NAME.match(text)
    if not m or m.group(1) not in _FAMILIES:
        known = ", ".join(f"{p}N" for p in _FAMILIES)
        raise FormatError(f"unknown format {name!r} (families: {known}; see `mixq formats`)")
    prefix, bits, rest = m.group(1), int(m.group(2)), m.group(3)
    tokens = [t for t in rest.split("-") if t]
    return _FAMILIES[prefix][0](bits, tokens)


def group_tokens(name: str, tokens: list[str], allowed: set[str]) -> tuple[int | None, bool, list[str]]:
    """Split granularity tokens (``gN``, ``tensor``, ``ch``) from the others, which must be in ``allowed``."""
    group: int | None = None
    per_tensor = False
    others: list[str] = []
    for tok in tokens:
        if re.fullmatch(r"g\d+", tok):
            group = int(tok[1:])
        elif tok == "tensor":
            per_tensor = True
        elif tok == "ch":
            group = None
        elif tok in allowed or any(re.fullmatch(a, tok) for a in allowed):
            others.append(tok)
        else:
            raise FormatError(f"format {name!r}: unknown option {tok!r}")
    return group, per_tensor, others
