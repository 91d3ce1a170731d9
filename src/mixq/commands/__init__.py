"""The ``mixq`` sub-commands, one module each.

Each module has ``NAME`` (the sub-command), ``add_parser(subparsers)`` and ``run(args) -> int``;
``mixq.cli`` builds the parser from ``COMMANDS`` and dispatches.  User errors are ``MixqError``s.
"""

#: module names under mixq.commands, in the order ``mixq --help`` lists them
COMMANDS = ("formats", "quantize", "eval", "search", "report", "sensitivity", "allocate", "embed_eval", "generate",
            "plot_weights", "profile", "export", "database", "bench_speed")
