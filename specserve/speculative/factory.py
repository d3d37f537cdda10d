"""From `--speculative-*` flags to a (Drafter, Planner) pair for an engine.

add_cli_args(parser)                      # the flags (SGLang names)
spec = spec_config_from_args(args)        # -> SpecConfig (validated)
engine = LLMEngine(config)
engine.set_speculation(*build_speculation(spec, engine))
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from specserve.config import ConfigError, SpecConfig
from specserve.engine.engine import LLMEngine
from specserve.engine.model_runner import ModelRunner
from specserve.models.deepseek_v4 import DeepseekV4ForCausalLM
from specserve.models.qwen3 import tile_products
from specserve.models.qwen3_moe import set_moe_backend
from specserve.speculative.base import Drafter, NoDrafter
from specserve.speculative.block_drafter import DFlashDrafter
from specserve.speculative.calibration import load_sts
from specserve.speculative.checkpoint import load_drafter
from specserve.speculative.deepseek_v4_dspark import has_dspark, load_v4_dspark
from specserve.speculative.deepseek_v4_mtp import DeepseekV4MTPDrafter, MTPLayer, load_mtp_layer
from specserve.speculative.dflash import DFlashDraftModel
from specserve.speculative.dspark import DSparkDraftModel, DSparkHeads
from specserve.speculative.gate import DraftGate
from specserve.speculative.mtp import MTPDrafter, MTPModule
from specserve.speculative.ngram import NgramDrafter
from specserve.speculative.planner import Planner, PrefixScheduler, ThresholdPlanner
from specserve.speculative.profile import SPSTable, profile_sps

log = logging.getLogger(__name__)

DEFAULT_NGRAM_TOKENS = 4
DEFAULT_MTP_STEPS = 3


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("speculative decoding")
    g.add_argument(
        "--speculative-algorithm",
        default="NONE",
        metavar="{NONE,NGRAM,NEXTN,MTP,DFLASH,DSPARK}",
        help="draft algorithm (MTP is an alias of NEXTN); default NONE",
    )
    g.add_argument("--speculative-draft-model-path", help="drafter checkpoint folder")
    g.add_argument("--speculative-num-steps", type=int, help="NEXTN chain length (default 3)")
    g.add_argument(
        "--speculative-eagle-topk", type=int, default=1, help="draft tree width (only 1)"
    )
    g.add_argument(
        "--speculative-num-draft-tokens",
        type=int,
        help="verify window = draft tokens + 1 (default: NGRAM 5, NEXTN steps + 1, "
        "DFLASH/DSPARK block size + 1)",
    )
    g.add_argument(
        "--speculative-dspark-block-size",
        type=int,
        help="DFLASH/DSPARK draft tokens per step (default: the checkpoint's block_size)",
    )
    g.add_argument(
        "--speculative-verify-policy",
        help="full | threshold | scheduler (the DSpark prefix scheduler; default for DSPARK)",
    )
    g.add_argument(
        "--speculative-dspark-confidence-threshold",
        type=float,
        default=0.5,
        help="threshold policy: verify up to the first confidence below this (default 0.5)",
    )
    g.add_argument(
        "--speculative-dspark-sps-table-path",
        help="scheduler policy: SPS table JSON to load; profiled at start-up and written there "
        "if the file does not exist (default: a file per model, flags and machine under "
        "~/.cache/specserve/sps, so only the first start profiles)",
    )
    g.add_argument(
        "--speculative-adaptive-drafting",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per request and step, decode plainly where drafting does not pay (measured step "
        "times vs expected acceptance; probed again later; lossless). On by default; "
        "--no-speculative-adaptive-drafting drafts on every step",
    )
    g.add_argument(
        "--speculative-dspark-confidence-sts-path",
        help="STS temperatures (sts.json) calibrating the DSpark confidence head",
    )


def spec_config_from_args(args: argparse.Namespace) -> SpecConfig:
    return SpecConfig(
        algorithm=args.speculative_algorithm,
        draft_model_path=_draft_model_path(args),
        num_steps=args.speculative_num_steps,
        eagle_topk=args.speculative_eagle_topk,
        num_draft_tokens=args.speculative_num_draft_tokens,
        block_size=args.speculative_dspark_block_size,
        verify_policy=args.speculative_verify_policy,
        confidence_threshold=args.speculative_dspark_confidence_threshold,
        sps_table_path=args.speculative_dspark_sps_table_path,
        confidence_sts_path=args.speculative_dspark_confidence_sts_path,
        adaptive_drafting=args.speculative_adaptive_drafting,
    )


def _draft_model_path(args: argparse.Namespace) -> str | None:
    """--speculative-draft-model-path, else for DSPARK the target folder when it carries a
    DeepSeek-V4 DSpark drafter (as SGLang serves DeepSeek-V4-Flash-DSpark)."""
    path, target = args.speculative_draft_model_path, getattr(args, "model_path", None)
    if path is None and args.speculative_algorithm.upper() == "DSPARK" and target:
        return str(target) if has_dspark(target) else None
    return path


def build_speculation(
    spec: SpecConfig, engine: LLMEngine, moe_backend: str | None = None
) -> tuple[Drafter, Planner]:
    """The drafter and verify planner for `engine` (whose target parts the drafter shares).
    `moe_backend`: the format of a MoE drafter's experts (None: as the checkpoint stores it)."""
    drafter = build_drafter(spec, engine, moe_backend)
    return drafter, build_planner(spec, engine, drafter)


def build_drafter(spec: SpecConfig, engine: LLMEngine, moe_backend: str | None = None) -> Drafter:
    algo = spec.algorithm
    window = None if spec.num_draft_tokens is None else spec.num_draft_tokens - 1
    if spec.confidence_sts_path and algo != "DSPARK":
        raise ConfigError(
            "--speculative-dspark-confidence-sts-path needs --speculative-algorithm DSPARK"
        )
    if algo == "NONE":
        return NoDrafter()
    if algo == "NGRAM":
        return NgramDrafter(window or spec.num_steps or DEFAULT_NGRAM_TOKENS)
    path = Path(spec.draft_model_path or "")
    if not path.is_dir():
        raise ConfigError(f"--speculative-draft-model-path {spec.draft_model_path}: no such folder")
    if isinstance(engine.model, DeepseekV4ForCausalLM):
        return _deepseek_v4_drafter(spec, engine.model, path, window, moe_backend)
    cfg = engine.config
    model = load_drafter(path, engine.target_handle(), cfg.torch_dtype, cfg.device)
    if moe_backend is not None:
        set_moe_backend(model, moe_backend)
    if isinstance(engine.runner, ModelRunner) and engine.runner.backend.uses_kernels:
        tile_products(model)  # the drafter's products on the C++ kernels too
    if algo == "NEXTN":
        if not isinstance(model, MTPModule):
            raise ConfigError(f"--speculative-algorithm NEXTN: {path} is not an MTP drafter")
        return MTPDrafter(model, spec.num_steps or window or DEFAULT_MTP_STEPS)
    if not isinstance(model, DFlashDraftModel):
        raise ConfigError(f"--speculative-algorithm {algo}: {path} is an MTP drafter")
    block = _block_size(spec, model.config.block_size, window)
    if algo == "DSPARK" and isinstance(model, DSparkDraftModel):
        return DFlashDrafter(model, block, _sts(spec, model))
    return DFlashDrafter(model, block)


def _deepseek_v4_drafter(
    spec: SpecConfig,
    target: DeepseekV4ForCausalLM,
    path: Path,
    window: int | None,
    moe_backend: str | None,
) -> Drafter:
    """NEXTN: the checkpoint's MTP layer; DSPARK: its DSpark stages (the target folder's own or
    a separate drafter folder)."""
    if spec.algorithm not in ("NEXTN", "DSPARK"):
        raise ConfigError(
            f"--speculative-algorithm {spec.algorithm} is not supported for DeepSeek-V4"
        )
    model = (
        load_mtp_layer(path, target) if spec.algorithm == "NEXTN" else load_v4_dspark(path, target)
    )
    if moe_backend is not None:
        set_moe_backend(model, moe_backend)
    if isinstance(model, MTPLayer):
        return DeepseekV4MTPDrafter(model, target, spec.num_steps or window or DEFAULT_MTP_STEPS)
    block = _block_size(spec, model.block_size, window)
    return DFlashDrafter(model, block, _sts(spec, model))


def _sts(spec: SpecConfig, model: DSparkHeads) -> torch.Tensor | None:
    """The STS temperatures of --speculative-dspark-confidence-sts-path, if given."""
    if not spec.confidence_sts_path:
        return None
    if model.confidence_head is None:
        raise ConfigError(f"{spec.confidence_sts_path}: the drafter has no confidence head")
    return load_sts(spec.confidence_sts_path)


def _block_size(spec: SpecConfig, trained: int, window: int | None) -> int:
    block = spec.block_size or window or trained
    if block > trained:
        raise ConfigError(
            f"--speculative-dspark-block-size {block} exceeds the drafter's trained block_size "
            f"{trained}"
        )
    if window is not None and spec.block_size is not None and window != spec.block_size:
        raise ConfigError(
            f"--speculative-num-draft-tokens {window + 1} must equal "
            f"--speculative-dspark-block-size + 1 ({spec.block_size + 1})"
        )
    return block


def build_planner(spec: SpecConfig, engine: LLMEngine, drafter: Drafter) -> Planner:
    planner = _verify_planner(spec, engine, drafter)
    if spec.adaptive_drafting and drafter.max_draft_tokens > 0:
        return DraftGate(planner, head_confidences=drafter.has_confidence_head)
    return planner


def _verify_planner(spec: SpecConfig, engine: LLMEngine, drafter: Drafter) -> Planner:
    policy = spec.policy
    if policy == "full" or drafter.max_draft_tokens == 0:
        return Planner()
    if policy == "threshold":
        return ThresholdPlanner(spec.confidence_threshold)
    return PrefixScheduler(sps_table(spec, engine, drafter))


def sps_table(spec: SpecConfig, engine: LLMEngine, drafter: Drafter) -> SPSTable:
    """Load the SPS table, or profile it on this machine (and save it if a path was given)."""
    path = spec.sps_table_path
    if path and Path(path).is_file():
        return SPSTable.load(path)
    sched = engine.config.scheduler
    top = min(
        sched.chunked_prefill_size,
        sched.max_running_requests * (drafter.max_draft_tokens + 1),
        512,
    )
    sizes = sorted({1, top, *(2**i for i in range(10) if 2**i <= top)})
    start = time.perf_counter()
    table = profile_sps(engine.profile_step, sizes, repeats=5)
    took = time.perf_counter() - start
    log.info("SPS table profiled at %s batch sizes in %.1f s", len(sizes), took)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
        log.info("SPS table saved to %s", path)
    return table
