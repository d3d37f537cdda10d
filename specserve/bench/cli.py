"""`specserve bench serve` and `specserve bench compare` (heavy imports happen in handlers)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench", help="benchmark OpenAI-compatible servers (sglang.bench_serving-compatible)"
    )
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")

    # Defaults live in BenchConfig; flags not given are left out of the namespace.
    s = sub.add_parser(
        "serve",
        help="one benchmark run against a running server",
        argument_default=argparse.SUPPRESS,
    )
    s.add_argument("--base-url", help="server root, default http://127.0.0.1:30000")
    s.add_argument("--model", help="model name; default: the first one /v1/models lists")
    s.add_argument("--backend", choices=["openai", "openai-chat"], help="default openai")
    s.add_argument("--dataset-name", choices=["random", "random-ids", "jsonl", "sharegpt"])
    s.add_argument("--dataset-path", help="file for jsonl and sharegpt")
    s.add_argument("--tokenizer", help="directory with tokenizer.json (or the file)")
    s.add_argument("--random-input-len", type=int, help="default 1024")
    s.add_argument("--random-output-len", type=int, help="default 1024")
    s.add_argument("--random-range-ratio", type=float, help="1.0 = exact lengths (default)")
    s.add_argument("--random-vocab-size", type=int, help="random-ids: draw ids below this")
    s.add_argument("--sharegpt-output-len", type=int, help="fix sharegpt output lengths")
    s.add_argument("--num-prompts", type=int, help="default 1000")
    s.add_argument("--max-concurrency", type=int, help="default unbounded")
    s.add_argument("--request-rate", type=float, help="requests/s, Poisson; default inf")
    s.add_argument("--warmup-requests", type=int, help="default 1")
    s.add_argument("--temperature", type=float, help="default 0.0")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--seed", type=int, help="default 1")
    s.add_argument("--output-file", help="JSONL file to append the result to")
    s.add_argument("--output-details", action="store_true", help="add per-request lists")
    s.add_argument("--request-timeout", type=float, help="seconds of silence before failing")
    s.add_argument("--disable-tqdm", action="store_true")
    s.add_argument("--tag", help="free text stored in the result")
    s.set_defaults(func=_serve)

    c = sub.add_parser("compare", help="start servers (arms) and run workloads on each")
    c.add_argument("--config", required=True, help="compare YAML")
    c.add_argument("--out", default="bench-compare", help="output directory")
    c.set_defaults(func=_compare)


def _serve(args: argparse.Namespace) -> int:
    from specserve.bench.serve import BenchError, config_from_options, run
    from specserve.cli import CLIError

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "bench_command")}
    try:
        result = run(config_from_options(options))
    except BenchError as e:
        raise CLIError(str(e)) from None
    return 0 if result["completed"] else 1


def _compare(args: argparse.Namespace) -> int:
    from specserve.bench.compare import CompareError, run_compare
    from specserve.cli import CLIError

    try:
        return run_compare(args.config, args.out)
    except CompareError as e:
        raise CLIError(str(e)) from None
