"""The `specserve` command: one entry point, one subcommand per part.

Each part registers its own subcommands from a small `cli` module that imports
nothing heavy at import time, so `specserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules exposing `register(subparsers)`; each adds its parsers with `set_defaults(func=...)`.
PART_MODULES: tuple[str, ...] = (
    "specserve.server.cli",
    "specserve.quant.cli",
    "specserve.bench.cli",
    "specserve.cluster.cli",
    "specserve.train.cli",
)


class CLIError(Exception):
    """A user-facing problem with flags, paths or inputs: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specserve", description="LLM serving with DSpark speculative decoding."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in PART_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"specserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
