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
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    _add_spec_args(p)
    p.set_defaults(func=run)


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    try:
        from specserve.spec.factory import add_cli_args
    except ImportError:  # speculative decoding not built yet
        return
    add_cli_args(p)


def build_engine(args: argparse.Namespace):
    """Flags -> a ready LLMEngine (and the speculative algorithm's name)."""
    from specserve.cli import CLIError
    from specserve.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
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
        )
        algorithm = "NONE"
        extra = {}
        if hasattr(args, "speculative_algorithm"):
            from specserve.spec.factory import build_speculation, spec_config_from_args

            spec = spec_config_from_args(args)
            algorithm = spec.algorithm
            engine = LLMEngine(config)
            if algorithm != "NONE":
                drafter, planner = build_speculation(spec, engine)
                engine.set_speculation(drafter, planner)
            return engine, algorithm
        return LLMEngine(config, **extra), algorithm
    except (ConfigError, ValueError) as e:
        raise CLIError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from specserve.server.api import ServerConfig, create_app
    from specserve.server.async_engine import AsyncEngine

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    engine, algorithm = build_engine(args)
    name = args.served_model_name or Path(args.model_path).resolve().name
    async_engine = AsyncEngine(engine)
    async_engine.start()
    app = create_app(async_engine, ServerConfig(name, args.api_key, algorithm))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        async_engine.shutdown()
    return 0
