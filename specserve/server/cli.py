"""`specserve serve`: flags (SGLang names) -> configs -> engine -> uvicorn."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    p.add_argument("--max-running-requests", type=int, default=64)
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--max-total-tokens", type=int, default=None, help="KV-cache size in tokens")
    mem.add_argument(
        "--mem-fraction-static",
        type=float,
        default=None,
        help="KV-cache size as a fraction of free memory (default 0.1)",
    )
    p.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=2048,
        help="token budget of one forward (prefill chunks + decode tokens)",
    )
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--disable-radix-cache", action="store_true", help="turn off prefix caching")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument("--seed", type=int, default=0)
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
    _add_parallel_args(p)
    _add_spec_args(p)
    p.set_defaults(func=run)


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


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    try:
        from specserve.speculative.factory import add_cli_args
    except ImportError:  # speculative decoding not built yet
        return
    add_cli_args(p)


def build_engine(args: argparse.Namespace):
    """Flags -> a ready LLMEngine (and the speculative algorithm's name)."""
    from specserve.cli import CLIError
    from specserve.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
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
        )
        from specserve.config import ModelConfig

        model_cfg = ModelConfig.from_pretrained(path)
        sched = SchedulerConfig(
            max_running_requests=args.max_running_requests,
            chunked_prefill_size=args.chunked_prefill_size,
            context_length=args.context_length or model_cfg.max_position_embeddings,
        )
        config = EngineConfig(
            model_path=str(path),
            dtype=args.dtype,
            device=args.device,
            seed=args.seed,
            cache=cache,
            scheduler=sched,
            grammar_backend=args.grammar_backend,
        )
        ranks = _rank_spec(args, cache)
        from specserve.models.qwen3_moe import is_mxfp4_checkpoint

        mxfp4 = ranks.moe_backend == "mxfp4" or (
            ranks.moe_backend is None and is_mxfp4_checkpoint(model_cfg)
        )
        ranks.parallel.check_model(model_cfg, mxfp4)
        spec = None
        if hasattr(args, "speculative_algorithm"):
            from specserve.speculative.factory import spec_config_from_args

            spec = spec_config_from_args(args)
        group = start_ranks(ranks) if ranks.parallel.world_size > 1 else None
        try:
            engine = LLMEngine(config, moe_backend=ranks.moe_backend, group=group)
            if spec is not None and spec.algorithm != "NONE":
                _install_speculation(engine, spec, args.speculative_moe_runner_backend)
        except BaseException:
            if group is not None:
                group.abort()
            raise
        return engine, "NONE" if spec is None else spec.algorithm
    except (ConfigError, ValueError, DistributedError) as e:
        raise CLIError(str(e)) from None


def _install_speculation(engine, spec, moe_backend: str) -> None:
    from specserve.engine.distributed import DrafterTarget
    from specserve.speculative.factory import build_speculation

    group = engine.group
    if group is not None and group.parallel.tp_size > 1 and spec.algorithm != "NGRAM":
        # Drafters share the target's embedding and LM head, which --tp-size splits by vocab.
        engine.model = DrafterTarget(
            engine.model, engine.config.model_path, engine.config.torch_dtype, engine.config.device
        )
    drafter, planner = build_speculation(spec, engine)
    _set_drafter_moe_backend(drafter, _moe_backend(moe_backend))
    engine.set_speculation(drafter, planner)


def _set_drafter_moe_backend(drafter, backend: str | None) -> None:
    """Convert the MoE experts of the drafter's networks (if any) to `backend`."""
    from torch import nn

    from specserve.models.qwen3_moe import set_moe_backend

    if backend is None:
        return
    for module in vars(drafter).values():
        if isinstance(module, nn.Module):
            set_moe_backend(module, backend)


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from specserve.server.api import ServerConfig, create_app
    from specserve.server.async_engine import AsyncEngine

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.node_rank > 0:
        return _run_worker_node(args)
    engine, algorithm = build_engine(args)
    name = args.served_model_name or Path(args.model_path).resolve().name
    async_engine = AsyncEngine(engine)
    async_engine.start()
    app = create_app(
        async_engine, ServerConfig(name, args.api_key, algorithm, args.tool_call_parser)
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        async_engine.shutdown()
        engine.close()
    return 0


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
        )
        serve_steps(start_ranks(_rank_spec(args, cache)))
    except (ConfigError, DistributedError) as e:
        raise CLIError(str(e)) from None
    return 0
