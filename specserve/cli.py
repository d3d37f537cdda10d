"""The `specserve` command: one entry point, one subcommand per part.

Each part registers its own subcommands from a small `cli` module. Only the module of
the command being run is imported (some parsers import torch), so `specserve cluster ...`
starts fast; `specserve --help` imports them all.
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
# The first word of a command line -> the module that registers that command.
COMMAND_MODULES: dict[str, str] = {
    "serve": "specserve.server.cli",
    "quantize": "specserve.quant.cli",
    "bench": "specserve.bench.cli",
    "cluster": "specserve.cluster.cli",
    "train": "specserve.train.cli",
    "eval": "specserve.train.cli",
}


class CLIError(Exception):
    """A user-facing problem with flags, paths or inputs: printed as one line, exit code 2."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or only of `command` when it is a known one."""
    parser = argparse.ArgumentParser(
        prog="specserve", description="LLM serving with DSpark speculative decoding."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = (COMMAND_MODULES[command],) if command in COMMAND_MODULES else PART_MODULES
    for name in names:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
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
