"""`specserve train ...` and `specserve eval drafter`: the drafter-training command line.

Imports stay inside the handlers so `specserve --help` does not load torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    from specserve.train.recipe import RecipeParser

    train = sub.add_parser("train", help="train a tokenizer, target LM or drafter")
    tsub = train.add_subparsers(
        dest="train_command", required=True, metavar="STEP", parser_class=RecipeParser
    )
    for add in (
        _add_corpus,
        _add_tokenizer,
        _add_target,
        _add_prompts,
        _add_gendata,
        _add_drafter,
        _add_cache_target,
        _add_plot,
        _add_calibrate,
    ):
        add(tsub)
    ev = sub.add_parser("eval", help="offline evaluation")
    _add_eval(ev.add_subparsers(dest="eval_command", required=True, metavar="WHAT"))


def _add_corpus(tsub) -> None:
    p = tsub.add_parser("corpus", help="export the demo corpus (stdlib code, man-page prose)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-mb", type=float, default=24.0, help="cap per domain")
    p.set_defaults(func=_corpus)


def _add_tokenizer(tsub) -> None:
    p = tsub.add_parser("tokenizer", help="byte-level BPE on the corpora's train split")
    p.add_argument("--corpus", nargs="+", required=True, metavar="DIR")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True)
    _threads(p)
    p.set_defaults(func=_tokenizer)


def _add_target(tsub) -> None:
    p = tsub.add_parser("target", help="pre-train a Qwen3 target LM")
    p.run_sections = ("model", "train", "max_bytes_per_corpus")
    p.add_argument(
        "--config",
        required=True,
        help='YAML or JSON: {"model": {...}, "train": {...}} and any flags of this command',
    )
    p.add_argument("--corpus", nargs="+", required=True, metavar="DIR")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--save-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument(
        "--init-from",
        metavar="DIR",
        help="start from the weights in DIR (saved by `train target`, same model) instead of a "
        "random init: the next phase of a curriculum, e.g. longer sequences",
    )
    _parallel(p, overrides=True)
    _common(p, resume=True)
    p.set_defaults(func=_target)


def _add_prompts(tsub) -> None:
    p = tsub.add_parser("prompts", help="cut prompts (token windows) from corpus files")
    p.add_argument("--corpus", nargs="+", required=True, metavar="DIR")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--split", choices=["train", "heldout"], default="train")
    p.add_argument("--per-corpus", type=int, default=1000)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument(
        "--whole-files",
        action="store_true",
        help="each prompt: the first --prompt-len tokens of its own file (shorter files skipped)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    _threads(p)
    p.set_defaults(func=_prompts)


def _add_gendata(tsub) -> None:
    p = tsub.add_parser("gen-data", help="continue prompts with the target (training data)")
    p.add_argument("--target", required=True)
    p.add_argument("--prompts", required=True, help="JSON lines with token_ids or text")
    p.add_argument("--out", required=True)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64)
    _common(p, resume=False)
    p.set_defaults(func=_gendata)


def _add_drafter(tsub) -> None:
    p = tsub.add_parser("drafter", help="train an MTP, DFlash or DSpark drafter")
    _recipe(p)
    p.add_argument("--algorithm", required=True, choices=["mtp", "dflash", "dspark"])
    p.add_argument("--target", required=True)
    p.add_argument("--data", required=True, nargs="+", help="gen-data folders (several are pooled)")
    p.add_argument("--out", required=True)
    _drafter_model_flags(p)
    _drafter_loss_flags(p)
    p.add_argument("--mtp-depth", type=int, default=3)
    _drafter_schedule_flags(p)
    _parallel(p, overrides=False)
    p.add_argument(
        "--cache-target-states",
        action="store_true",
        help="first write the target's states of the data to OUT/target_cache, then train from "
        "it (kept for --resume)",
    )
    p.add_argument("--target-cache", help="train from this cache (`specserve train cache-target`)")
    _cache_dtype(p)
    _common(p, resume=True)
    p.set_defaults(func=_drafter)


def _drafter_model_flags(p: argparse.ArgumentParser) -> None:
    """The drafter's shape: block, layers, the target layers it reads, the Markov head."""
    p.add_argument("--block-size", type=int, default=7)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--target-layer-ids", type=int, nargs="+")
    p.add_argument("--mask-token-id", type=int, help="default: <|im_start|> (id 1)")
    p.add_argument("--markov-rank", type=int, default=128)
    p.add_argument("--markov-head-type", choices=["vanilla", "gated", "rnn"], default="vanilla")


def _drafter_loss_flags(p: argparse.ArgumentParser) -> None:
    """Anchors per sequence, slot weights and the weights of the three losses."""
    p.add_argument("--anchors-per-seq", type=int, default=16)
    p.add_argument(
        "--loss-decay-gamma",
        type=float,
        default=4.0,
        help="DFlash/DSpark slot weights exp(-(k-1)/gamma) (DeepSpec's block-7 default: 4)",
    )
    for flag, loss in (
        ("--ce-loss-alpha", "CE"),
        ("--l1-loss-alpha", "TV (L1)"),
        ("--confidence-head-alpha", "confidence BCE"),
    ):
        p.add_argument(flag, type=float, help=f"{loss} loss weight (default: the algorithm's)")


def _drafter_schedule_flags(p: argparse.ArgumentParser) -> None:
    """Steps, learning-rate schedule, optimizer, seed and checkpoint interval."""
    p.add_argument("--steps", type=int, help="optimizer steps (default 300)")
    p.add_argument(
        "--num-train-epochs", type=float, help="instead of --steps: passes over the data"
    )
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, help="end of the cosine decay (default: lr / 10)")
    p.add_argument("--warmup-ratio", type=float, default=0.05, help="share of steps warming up")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global grad norm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)


def _add_cache_target(tsub) -> None:
    p = tsub.add_parser(
        "cache-target", help="write the target's states of drafter data to disk (once)"
    )
    _recipe(p)
    p.add_argument("--target", required=True)
    p.add_argument("--data", required=True, nargs="+", help="gen-data folders (several are pooled)")
    p.add_argument("--out", required=True, help="a new folder")
    p.add_argument(
        "--target-layer-ids",
        type=int,
        nargs="+",
        help="layers the drafter reads (default: as `train drafter` picks them)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences per target forward")
    _cache_dtype(p)
    _common(p, resume=False)
    p.set_defaults(func=_cache_target)


def _add_plot(tsub) -> None:
    p = tsub.add_parser("plot", help="draw a run's train_log.jsonl or TensorBoard log as a PNG")
    p.add_argument("--log", required=True, help="a run folder, train_log.jsonl or tensorboard/")
    p.add_argument("--out", required=True, help="PNG file")
    p.add_argument("--metrics", nargs="+", help="default: every logged metric but lr")
    p.set_defaults(func=_plot)


def _add_calibrate(tsub) -> None:
    p = tsub.add_parser("calibrate", help="fit STS temperatures of a DSpark confidence head")
    p.add_argument("--drafter", required=True)
    p.add_argument("--data", required=True, help="a gen-data folder of held-out prompts")
    p.add_argument("--target", help="default: the target named in the data's meta.json")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--out", help="default: DRAFTER/sts.json")
    _common(p, resume=False)
    p.set_defaults(func=_calibrate)


def _add_eval(esub) -> None:
    p = esub.add_parser("drafter", help="accept length per domain (and context length), no server")
    p.add_argument("--target", required=True)
    p.add_argument("--drafter", required=True)
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="gen-data folders (their prompts are used); one per context bucket",
    )
    p.add_argument("--temperature", type=float, nargs="+", default=[0.0], choices=[0.0, 1.0])
    p.add_argument("--block-size", type=int, help="draft tokens per round (MTP: chained steps)")
    p.add_argument("--json", help="also write the result here")
    _common(p, resume=False)
    p.set_defaults(func=_eval)


def _recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="recipe YAML holding flags of this command (flags win)")


def _parallel(p: argparse.ArgumentParser, overrides: bool) -> None:
    """Batching and precision flags; `overrides`: they override the run config's `train`."""
    p.add_argument(
        "--global-batch-size",
        "--batch-size",
        dest="global_batch_size",
        type=int,
        default=None if overrides else 16,
        help="sequences per optimizer step, over all processes",
    )
    p.add_argument(
        "--local-batch-size",
        type=int,
        default=None if overrides else 0,
        help="sequences per micro-batch and process; gradients accumulate up to the global "
        "batch (0: global batch / processes)",
    )
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None if overrides else "fp32")


def _cache_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])


def _threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")


def _common(p: argparse.ArgumentParser, resume: bool) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    _threads(p)
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from out/checkpoint.pt")


def _run(args, fn):
    """Set up torch, run `fn`, and turn bad input into a one-line CLI error."""
    import torch

    from specserve.cli import CLIError
    from specserve.config import ConfigError

    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    try:
        return fn()
    except (ValueError, ConfigError, FileNotFoundError, FileExistsError) as e:
        raise CLIError(str(e)) from None


def _run_parallel(args, fn):
    """`_run` inside torchrun's process group (a world of one without torchrun):
    `fn(world, device)`; -> (world, its result)."""
    from specserve.train.parallel import close_world, init_world

    def go():
        world, device = init_world(args.device)
        try:
            return world, fn(world, device)
        finally:
            close_world()

    return _run(args, go)


def _need_dirs(*paths: str) -> None:
    from specserve.cli import CLIError

    for path in paths:
        if not Path(path).is_dir():
            raise CLIError(f"{path}: no such folder")


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _corpus(args):
    from specserve.train.data import export_corpus

    _print(export_corpus(args.out, int(args.max_mb * (1 << 20))))


def _tokenizer(args):
    from specserve.train.tokenizer import train_tokenizer

    _need_dirs(*args.corpus)
    _run(args, lambda: train_tokenizer(args.corpus, args.vocab_size, args.out))
    print(f"tokenizer written to {args.out}")


def _target(args):
    from specserve.cli import CLIError
    from specserve.train.recipe import load_recipe
    from specserve.train.target import check_init, train_target

    _need_dirs(*args.corpus, args.tokenizer, *([args.init_from] if args.init_from else []))
    try:
        recipe = load_recipe(args.config)
    except ValueError as e:
        raise CLIError(str(e)) from None
    run_config = {k: recipe[k] for k in ("model", "train", "max_bytes_per_corpus") if k in recipe}
    if args.init_from:
        run_config["init"] = args.init_from
    flags = {
        "batch_size": args.global_batch_size,
        "local_batch_size": args.local_batch_size,
        "precision": args.precision,
    }
    run_config["train"] = run_config.get("train", {}) | {
        k: v for k, v in flags.items() if v is not None
    }
    if args.init_from:  # a clear error before any work, not a traceback from every rank
        try:
            check_init(run_config, args.tokenizer)
        except ValueError as e:
            raise CLIError(str(e)) from None
    world, summary = _run_parallel(
        args,
        lambda world, device: train_target(
            args.corpus,
            args.tokenizer,
            run_config,
            args.out,
            args.resume,
            device,
            args.save_dtype,
            world,
        ),
    )
    if world.main:
        _print({k: v for k, v in summary.items() if k != "log"})


def _prompts(args):
    from specserve.train.gendata import make_prompts

    _need_dirs(*args.corpus, args.tokenizer)
    n = _run(
        args,
        lambda: make_prompts(
            args.corpus,
            args.tokenizer,
            args.split,
            args.per_corpus,
            args.prompt_len,
            args.out,
            args.seed,
            args.whole_files,
        ),
    )
    print(f"{n} prompts written to {args.out}")


def _gendata(args):
    from specserve.train.gendata import generate_dataset

    _need_dirs(args.target)
    meta = _run(
        args,
        lambda: generate_dataset(
            args.target,
            args.prompts,
            args.out,
            args.prompt_len,
            args.max_new_tokens,
            args.temperature,
            args.batch_size,
            device=args.device,
        ),
    )
    _print(meta)


def _drafter(args):
    from specserve.cli import CLIError
    from specserve.train.drafter import DrafterSpec, train_drafter

    _need_dirs(args.target, *args.data)
    if args.steps is not None and args.num_train_epochs is not None:
        raise CLIError("give --steps or --num-train-epochs, not both")

    def go(world, device):
        spec = DrafterSpec(
            algorithm=args.algorithm,
            block_size=args.block_size,
            num_layers=args.num_layers,
            target_layer_ids=tuple(args.target_layer_ids) if args.target_layer_ids else None,
            markov_rank=args.markov_rank,
            markov_head_type=args.markov_head_type,
            mask_token_id=args.mask_token_id,
            anchors_per_seq=args.anchors_per_seq,
            loss_decay_gamma=args.loss_decay_gamma,
            mtp_depth=args.mtp_depth,
            ce_loss_alpha=args.ce_loss_alpha,
            l1_loss_alpha=args.l1_loss_alpha,
            confidence_head_alpha=args.confidence_head_alpha,
        )
        return train_drafter(
            spec,
            args.target,
            args.data,
            args.out,
            _drafter_schedule(args),
            args.resume,
            device,
            cache_states=args.cache_target_states,
            target_cache=args.target_cache,
            cache_dtype=args.cache_dtype,
            world=world,
        )

    world, summary = _run_parallel(args, go)
    if world.main:
        _print({k: v for k, v in summary.items() if k != "log"} | {"last": summary["log"][-1]})


def _drafter_schedule(args):
    from specserve.train.gendata import load_dataset
    from specserve.train.loop import TrainConfig

    steps = 300 if args.steps is None else args.steps
    if args.num_train_epochs is not None:
        n = len(load_dataset(args.data, pad=True)["input_ids"])
        steps = max(1, int(args.num_train_epochs * (n // args.global_batch_size)))
    return TrainConfig(
        steps=steps,
        batch_size=args.global_batch_size,
        local_batch_size=args.local_batch_size,
        precision=args.precision,
        lr=args.lr,
        min_lr=args.lr / 10 if args.min_lr is None else args.min_lr,
        warmup=max(1, round(steps * args.warmup_ratio)),
        weight_decay=args.weight_decay,
        grad_clip=args.max_grad_norm,
        seed=args.seed,
        checkpoint_minutes=args.checkpoint_minutes,
    )


def _cache_target(args):
    from specserve.models.loader import load_model
    from specserve.train.drafter import default_layer_ids
    from specserve.train.gendata import load_dataset
    from specserve.train.state_cache import CacheKey, write_cache

    _need_dirs(args.target, *args.data)

    def go(world, device):
        target, cfg = load_model(args.target, device=device)
        data = load_dataset(args.data, pad=True)
        ids = data["input_ids"].long()
        layers = args.target_layer_ids or default_layer_ids(cfg.num_hidden_layers)
        key = CacheKey.of(args.target, ids, layers, cfg.hidden_size)
        write_cache(
            target, key, ids, args.out, world, args.cache_dtype, args.batch_size, data["lengths"]
        )
        return key

    world, key = _run_parallel(args, go)
    if world.main:
        _print({"out": args.out, "dtype": args.cache_dtype} | vars(key))


def _plot(args):
    from specserve.train.runlog import plot_log

    drawn = _run(args, lambda: plot_log(args.log, args.out, args.metrics))
    print(f"{', '.join(drawn)} written to {args.out}")


def _calibrate(args):
    from specserve.train.calibrate import calibrate

    _need_dirs(args.drafter, args.data)
    _print(
        _run(
            args,
            lambda: calibrate(
                args.drafter, args.data, args.target, args.temperature, args.out, args.device
            ),
        )
    )


def _eval(args):
    from specserve.train.evaluate import evaluate_contexts

    _need_dirs(args.target, args.drafter, *args.data)
    results = _run(
        args,
        lambda: evaluate_contexts(
            args.target,
            args.drafter,
            args.data,
            tuple(args.temperature),
            args.block_size,
            args.device,
        ),
    )
    if args.json:
        body = results[0] if len(results) == 1 else results
        Path(args.json).write_text(json.dumps(body, indent=2) + "\n")
    for result in results:
        print(
            f"{result['algorithm']}  block {result['block_size']}  "
            f"temperature {result['temperature']:g}  context {result['context']}"
        )
        for dom, r in result["domains"].items():
            cond = " ".join(f"{x:.2f}" for x in r["conditional"])
            print(f"  {dom:8s} tau {r['tau']:.3f}  rounds {r['rounds']:5d}  accept|prev {cond}")
