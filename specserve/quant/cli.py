"""`specserve quantize mxfp4`: convert a checkpoint's MoE expert weights to MXFP4.

Imports torch (via `convert`) only when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from specserve.cli import CLIError


def register(subparsers: argparse._SubParsersAction) -> None:
    quantize = subparsers.add_parser("quantize", help="quantise a checkpoint's weights")
    methods = quantize.add_subparsers(dest="method", required=True, metavar="METHOD")
    mxfp4 = methods.add_parser(
        "mxfp4",
        help="MoE expert weights to MXFP4 (OCP microscaling, 4.25 bits/param)",
        description="Write a copy of a Hugging Face MoE checkpoint with every "
        "mlp.experts.*.{gate,up,down}_proj.weight stored as MXFP4 blocks/scales.",
    )
    mxfp4.add_argument("--model-path", type=Path, required=True, help="checkpoint folder")
    mxfp4.add_argument("--out", type=Path, required=True, help="new or empty output folder")
    mxfp4.set_defaults(func=run_mxfp4)


def run_mxfp4(args: argparse.Namespace) -> int:
    from specserve.quant.convert import ConversionError, convert_checkpoint

    try:
        report = convert_checkpoint(args.model_path, args.out)
    except ConversionError as e:
        raise CLIError(str(e)) from e
    print(
        f"converted {report.expert_weights} expert weights to MXFP4: "
        f"{report.expert_bytes_before / 2**20:.1f} MiB -> {report.expert_bytes_after / 2**20:.1f} MiB; "
        f"wrote {report.out_dir}"
    )
    return 0
