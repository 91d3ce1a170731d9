"""Command line: ``mixq <command>``.  A thin shell: it builds the parser from the command
modules (``mixq.commands``), runs the chosen one and turns user errors into one line and
exit code 2."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from types import ModuleType

from mixq.commands import COMMANDS
from mixq.errors import MixqError


def _modules() -> list[ModuleType]:
    return [importlib.import_module(f"mixq.commands.{name}") for name in COMMANDS]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixq", description="Mixed-precision weight quantization of transformer LLMs.")
    parser.set_defaults(command_line=shlex.join(["mixq", *(argv or [])]))
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _modules():
        module.add_parser(sub).set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # mixq never downloads; models come from disk
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args.run(args)
    except MixqError as e:
        print(f"mixq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
