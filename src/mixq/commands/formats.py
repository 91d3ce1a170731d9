"""``mixq formats``: every format family, and the exact bits per weight of examples."""

from __future__ import annotations

import argparse
import json
from typing import Any

NAME = "formats"
EXAMPLES = ("int8", "int8-sym", "int4-g128", "int4-g32", "int4-fmin-g32", "int3-g128", "int2-g64", "fp8-e4m3",
            "fp8-e5m2", "fp6-e3m2", "fp6-e2m3", "fp4-e2m1", "fp8-e4m3-dn", "log4", "nf4-g64", "nf3-g64", "mxfp4",
            "mxfp6-e3m2", "mxfp8-e4m3", "mxint8", "bfp4-g16", "bmf6-e3m2-g16", "blog4-g16", "fxp8-f5")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="list the number formats with their bits per weight")
    p.add_argument("--cols", type=int, default=4096, help="row width used for per-channel overheads (default 4096)")
    p.add_argument("--json", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    from mixq.formats import families, parse_format

    rows = [(n, parse_format(n).bits_per_weight((1, args.cols))) for n in EXAMPLES]
    if args.json:
        print(json.dumps({"families": families(), "formats": dict(rows), "cols": args.cols}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"formats (bits per weight for rows of {args.cols})")
    table.add_column("format")
    table.add_column("bits/weight", justify="right")
    for n, b in rows:
        table.add_row(n, f"{b:.4f}")
    console = Console()
    console.print(table)
    for prefix, text in families().items():
        console.print(f"[bold]{prefix}[/bold]  {text}")
    return 0
