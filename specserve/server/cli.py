"""`specserve serve`: flags (SGLang names) -> configs -> engine -> uvicorn."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specserve.engine.engine import LLMEngine

log = logging.getLogger("specserve.server")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model with an OpenAI-compatible HTTP API",
        description="Serve a Hugging Face checkpoint folder over HTTP.",
    )
    p.add_argument("--model-path", required=True, help="Hugging Face checkpoint folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument(
        "--served-model-name",
        default=None,
        help="name clients use in 'model' (default: the folder name)",
    )
    p.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="max prompt + output tokens (default: the model's)",
    )
    _add_scheduler_args(p)
    _add_cache_args(p)
    _add_runtime_args(p)
    _add_parallel_args(p)
    from specserve.speculative.factory import add_cli_args

    add_cli_args(p)
    p.set_defaults(func=run)


def _add_scheduler_args(p: argparse.ArgumentParser) -> None:
    """Admission: running and queued requests, timeouts, the logprobs cap."""
    p.add_argument("--max-running-requests", type=int, default=64)
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=4096,
        help="requests submitted and not yet streaming beyond which new ones get HTTP 429 with "
        "Retry-After; also the most completions (n × prompts) one request may ask for "
        "(default 4096)",
    )
    p.add_argument(
        "--queue-timeout",
        type=float,
        default=None,
        help="seconds a request may wait for its first output before it is aborted with "
        "HTTP 503 (default: no limit)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds open requests get to finish after SIGTERM/SIGINT before they are aborted "
        "with a final error event (default 30)",
    )
    p.add_argument(
        "--max-logprobs",
        type=int,
        default=20,
        help="the most top logprobs a request may ask for, at most 20 (default 20)",
    )


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    """KV cache size and layout, dtype and device."""
    mem = p.add_mutually_exclusive_group()
    mem.add_argument(
        "--max-total-tokens",
        type=int,
        default=None,
        help="KV-cache size in tokens (with prefix caching, a drafter that reads target hidden "
        "states adds captured layers x hidden size x dtype bytes per token)",
    )
    mem.add_argument(
        "--mem-fraction-static",
        type=float,
        default=None,
        help="KV-cache size as a fraction of free memory (default 0.1); with prefix caching, "
        "the hidden states kept for a NEXTN/DFLASH/DSPARK drafter share it (fewer tokens)",
    )
    p.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=2048,
        help="token budget of one forward (prefill chunks + decode tokens)",
    )
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="K/V cache dtype: auto (the model's --dtype), bfloat16 (bf16), float16 (fp16) or "
        "float32; a 16-bit cache under a float32 model halves the bytes attention reads and "
        "a token's cache memory (keys and values rounded once when written, sums in float32)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--disable-radix-cache",
        action="store_true",
        help="turn off prefix caching (and the drafter's hidden-state pool that goes with it)",
    )


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Access control, seeds, kernels, threads, structured output and tool calls, logging."""
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health "
        "(/docs and /openapi.json included)",
    )
    p.add_argument(
        "--disable-fastapi-docs",
        action="store_true",
        help="serve no /docs, /redoc or /openapi.json (with --api-key they need the key)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--attention-backend",
        default="torch",
        help="paged attention: torch (pure PyTorch, any device) or cpp (a C++ kernel for "
        "decode and verify steps on the CPU, compiled with g++ on first use)",
    )
    p.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: physical cores; see README on shared hosts)",
    )
    p.add_argument(
        "--grammar-backend",
        default="llguidance",
        choices=["llguidance", "none"],
        help="structured output (response_format, json_schema, regex, ebnf, guided_*)",
    )
    p.add_argument(
        "--tool-call-parser",
        default=None,
        choices=["hermes", "qwen25"],
        help="read <tool_call>{json}</tool_call> in chat output as tool_calls (tool_choice auto)",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )


MOE_BACKEND_CHOICES = ("auto", "torch", "mxfp4", "flashinfer_mxfp4")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MoE and parallelism")
    g.add_argument(
        "--moe-runner-backend",
        default="auto",
        choices=MOE_BACKEND_CHOICES,
        help="expert weights: torch (dense) or mxfp4 (4-bit; quantises a bf16/fp32 checkpoint "
        "on load); auto: as the checkpoint stores them; flashinfer_mxfp4 = mxfp4",
    )
    g.add_argument(
        "--speculative-moe-runner-backend",
        default="auto",
        choices=MOE_BACKEND_CHOICES,
        help="the same for the drafter's MoE layers",
    )
    g.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks")
    g.add_argument("--ep-size", type=int, default=1, help="expert-parallel ranks")
    g.add_argument("--nnodes", type=int, default=1, help="nodes the ranks are spread over")
    g.add_argument("--node-rank", type=int, default=0, help="this node's index (0 serves HTTP)")
    g.add_argument("--dist-init-addr", default=None, help="HOST:PORT where rank 0 meets the others")
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for all ranks to join and for any collective (default 300)",
    )


def _moe_backend(name: str) -> str | None:
    return {"auto": None, "flashinfer_mxfp4": "mxfp4"}.get(name, name)


def _rank_spec(args: argparse.Namespace, cache):
    from specserve.engine.distributed import RankSpec
    from specserve.models.parallel import ParallelConfig

    parallel = ParallelConfig(
        tp_size=args.tp_size,
        ep_size=args.ep_size,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        dist_init_addr=args.dist_init_addr,
        timeout_s=args.dist_timeout,
    )
    return RankSpec(
        str(args.model_path),
        parallel,
        args.dtype,
        args.device,
        cache,
        _moe_backend(args.moe_runner_backend),
    )


def build_engine(args: argparse.Namespace) -> tuple[LLMEngine, str]:
    """Flags -> a ready LLMEngine (and the speculative algorithm's name)."""
    from specserve.cli import CLIError
    from specserve.config import (
        CacheConfig,
        ConfigError,
        EngineConfig,
        SchedulerConfig,
        physical_cores,
    )
    from specserve.engine.distributed import DistributedError, start_ranks
    from specserve.engine.engine import LLMEngine

    path = Path(args.model_path)
    if not path.is_dir():
        raise CLIError(f"--model-path {args.model_path}: no such folder")
    try:
        cache = CacheConfig(
            page_size=args.page_size,
            max_total_tokens=args.max_total_tokens,
            mem_fraction_static=args.mem_fraction_static or 0.1,
            enable_prefix_caching=not args.disable_radix_cache,
            kv_cache_dtype=args.kv_cache_dtype,
        )
        from specserve.config import ModelConfig

        model_cfg = ModelConfig.from_pretrained(path)
        sched = SchedulerConfig(
            max_running_requests=args.max_running_requests,
            chunked_prefill_size=args.chunked_prefill_size,
            context_length=args.context_length or model_cfg.max_position_embeddings,
            max_queued_requests=args.max_queued_requests,
        )
        config = EngineConfig(
            model_path=str(path),
            dtype=args.dtype,
            device=args.device,
            seed=args.seed,
            cache=cache,
            scheduler=sched,
            attention_backend=args.attention_backend,
            num_threads=physical_cores() if args.num_threads is None else args.num_threads,
            grammar_backend=args.grammar_backend,
        )
        ranks = _rank_spec(args, cache)
        from specserve.models.qwen3_moe import is_mxfp4_checkpoint

        mxfp4 = ranks.moe_backend == "mxfp4" or (
            ranks.moe_backend is None and is_mxfp4_checkpoint(model_cfg)
        )
        ranks.parallel.check_model(model_cfg, mxfp4)
        from specserve.speculative.factory import spec_config_from_args

        spec = spec_config_from_args(args)
        if spec.sps_table_path is None:
            spec = replace(spec, sps_table_path=str(sps_cache_path(args)))
        group = start_ranks(ranks) if ranks.parallel.world_size > 1 else None
        try:
            start = time.perf_counter()
            engine = LLMEngine(config, moe_backend=ranks.moe_backend, group=group)
            log.info("target loaded in %.1f s", time.perf_counter() - start)
            if spec.algorithm != "NONE":
                start = time.perf_counter()
                _install_speculation(engine, spec, args.speculative_moe_runner_backend)
                log.info("speculation ready in %.1f s", time.perf_counter() - start)
        except BaseException:
            if group is not None:
                group.abort()
            raise
        return engine, spec.algorithm
    except (ConfigError, ValueError, DistributedError) as e:
        raise CLIError(str(e)) from None


def sps_cache_path(args: argparse.Namespace, cache_dir: Path | None = None) -> Path:
    """Where the SPS table of this model, these flags and this machine is kept: profiled at the
    first start, loaded at the next ones. Anything that changes step times changes the key."""
    import torch

    def files(folder: str | None) -> list:
        if folder is None or not Path(folder).is_dir():
            return []
        found = sorted(Path(folder).resolve().glob("*.json")) + sorted(
            Path(folder).resolve().glob("*.safetensors")
        )
        return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in found]

    flags = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_IN_SPS_KEY}
    key = {
        "target": files(args.model_path),
        "drafter": files(getattr(args, "speculative_draft_model_path", None)),
        "flags": {k: str(v) for k, v in flags.items()},
        "machine": [platform.node(), platform.machine(), platform.processor(), os.cpu_count()],
        "torch": [torch.__version__, torch.get_num_threads()],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (cache_dir or home / "specserve" / "sps") / f"{digest}.json"


# flags that cannot change a target step's time
_NOT_IN_SPS_KEY = frozenset(
    {"func", "host", "port", "served_model_name", "api_key", "log_level", "seed", "command"}
    | {"max_queued_requests", "queue_timeout", "shutdown_timeout", "max_logprobs"}
    | {"disable_fastapi_docs"}
    | {"speculative_dspark_sps_table_path", "dist_init_addr", "node_rank", "dist_timeout"}
)


def _install_speculation(engine, spec, moe_backend: str) -> None:
    from specserve.speculative.factory import build_speculation

    engine.set_speculation(*build_speculation(spec, engine, _moe_backend(moe_backend)))


def _check_server_args(args: argparse.Namespace) -> None:
    from specserve.cli import CLIError
    from specserve.core import MAX_LOGPROBS

    if args.queue_timeout is not None and not args.queue_timeout > 0:
        raise CLIError("--queue-timeout must be positive")
    if not args.shutdown_timeout >= 0:
        raise CLIError("--shutdown-timeout must be at least 0")
    if not 0 <= args.max_logprobs <= MAX_LOGPROBS:
        raise CLIError(f"--max-logprobs must be in [0, {MAX_LOGPROBS}]")


def run(args: argparse.Namespace) -> int:
    import logging

    from specserve.server.api import ServerConfig, create_app
    from specserve.server.async_engine import AsyncEngine
    from specserve.server.lifecycle import serve

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.node_rank > 0:
        return _run_worker_node(args)
    _check_server_args(args)
    engine, algorithm = build_engine(args)
    name = args.served_model_name or Path(args.model_path).resolve().name
    async_engine = AsyncEngine(engine)
    config = ServerConfig(
        name,
        args.api_key,
        algorithm,
        args.max_logprobs,
        args.queue_timeout,
        args.disable_fastapi_docs,
        tool_call_parser=args.tool_call_parser,
    )
    app = create_app(async_engine, config)
    try:
        return serve(async_engine, app, args.host, args.port, args.log_level, args.shutdown_timeout)
    finally:
        engine.close()


def _run_worker_node(args: argparse.Namespace) -> int:
    """A node other than 0: its ranks only run the batches rank 0 broadcasts; no HTTP."""
    from specserve.cli import CLIError
    from specserve.config import CacheConfig, ConfigError
    from specserve.engine.distributed import DistributedError, serve_steps, start_ranks

    try:
        cache = CacheConfig(
            page_size=args.page_size,
            max_total_tokens=args.max_total_tokens,
            mem_fraction_static=args.mem_fraction_static or 0.1,
            kv_cache_dtype=args.kv_cache_dtype,
        )
        serve_steps(start_ranks(_rank_spec(args, cache)))
    except (ConfigError, DistributedError) as e:
        raise CLIError(str(e)) from None
    return 0
