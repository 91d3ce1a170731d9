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


GRANULARITIES = ("gN", "tensor", "ch")  # -g128 (groups of 128), -tensor, -ch (per channel, the default)


def group_tokens(name: str, tokens: list[str], allowed: set[str], *,
                 granularity: tuple[str, ...] = GRANULARITIES) -> tuple[int | None, bool, list[str]]:
    """Split granularity tokens (``gN``, ``tensor``, ``ch``; those of ``granularity`` are
    accepted) from the others, which must be in ``allowed`` (strings or regular expressions).
    A repeated token and a second granularity token are refused: no token overrides another."""
    full = spelled(name, tokens)
    group: int | None = None
    per_tensor = False
    grain: str | None = None
    others: list[str] = []
    for i, tok in enumerate(tokens):
        if tok in tokens[:i]:
            raise FormatError(f"format {full!r}: option {tok!r} given twice")
        kind = "gN" if re.fullmatch(r"g\d+", tok) else tok if tok in GRANULARITIES else None
        if kind is not None:
            if kind not in granularity:
                takes = ", ".join(f"-{g}" for g in granularity) or "no granularity option"
                raise FormatError(f"format {full!r}: option {tok!r} does not apply (it takes {takes})")
            if grain is not None:
                raise FormatError(f"format {full!r}: {grain!r} and {tok!r} clash (one granularity)")
            grain = tok
            group = int(tok[1:]) if kind == "gN" else None
            per_tensor = kind == "tensor"
        elif tok in allowed or any(re.fullmatch(a, tok) for a in allowed):
            others.append(tok)
        else:
            raise FormatError(f"format {full!r}: unknown option {tok!r}")
    return group, per_tensor, others


def spelled(name: str, tokens: list[str]) -> str:
    """A format name as written: ``int4`` and ``["sym", "g32"]`` -> ``int4-sym-g32``."""
    return "-".join([name, *tokens])


def exclusive(name: str, tokens: list[str], kind: str, patterns: tuple[str, ...]) -> str | None:
    """The one token of ``tokens`` that fully matches a pattern of ``patterns`` (None if none);
    two such tokens (``sym`` and ``fmin``, ``e4m3`` and ``e5m2``) clash."""
    found = [t for t in tokens if any(re.fullmatch(p, t) for p in patterns)]
    if len(found) > 1:
        raise FormatError(f"format {name!r}: {' and '.join(repr(t) for t in found)} clash (one {kind})")
    return found[0] if found else None
