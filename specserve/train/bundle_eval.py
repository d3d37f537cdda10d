"""What a demo-bundle build measures: the target's held-out LM loss by context position, the
drafters' held-out accept length per context bucket and temperature (as `eval drafter`), the
engine cross-check, per-token costs, and the time of each stage from full-size steps timed on
random tokens (`python -m specserve.train.bundle --estimate`)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from specserve.train.bundle import ALGORITHMS, EVAL_RUNS, TEMPERATURES, Recipe, gen_batch, log


# -- the target --------------------------------------------------------------------------------
@torch.no_grad()
def heldout_position_loss(
    target_dir: Path, prompts_file: Path, edges: tuple[int, ...], device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Mean next-token loss (nats) of the target over whole held-out files (one prompt each),
    per domain and per range [lo, hi) of the predicted token's position."""
    from specserve.models.attention import CausalAttention
    from specserve.models.loader import load_model

    model, _ = load_model(target_dir, device=device)
    by_domain: dict[str, list[list[int]]] = {}
    for line in prompts_file.read_text().splitlines():
        item = json.loads(line)
        by_domain.setdefault(item["domain"], []).append(item["token_ids"])
    out = {}
    for dom, rows in sorted(by_domain.items()):
        sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
        counts = torch.zeros(len(edges) - 1, dtype=torch.float64)
        for ids in rows:
            x = torch.tensor(ids, device=device)
            t = len(ids) - 1
            hidden = model(x[:-1], torch.arange(t, device=device), CausalAttention(1, t)).hidden
            nll = F.cross_entropy(model.compute_logits(hidden).float(), x[1:], reduction="none")
            where = torch.bucketize(torch.arange(1, t + 1), torch.tensor(edges[1:]), right=True)
            keep = where < len(sums)
            sums.index_add_(0, where[keep], nll.cpu().double()[keep])
            counts.index_add_(0, where[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
        out[dom] = {
            f"{lo}-{hi}": round(float(s / c), 4) if c else None
            for lo, hi, s, c in zip(edges[:-1], edges[1:], sums, counts, strict=True)
        }
    return out


# -- the drafters ------------------------------------------------------------------------------
def evaluate_bundle(recipe: Recipe, out: Path, heldout: dict[int, Path], device: str) -> dict:
    """Held-out tau of every EVAL_RUNS drafter per context bucket and temperature, the engine
    cross-check on the shortest bucket and the per-token costs; kept in `out/eval.json`, so an
    interrupted evaluation resumes."""
    from specserve.train.evaluate import evaluate_drafter

    path = out / "eval.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    inputs = _fingerprint([out / "target", *(out / a for a in ALGORITHMS), *heldout.values()])
    if results.get("inputs") != inputs:  # other models or held-out data: measure them anew
        results = {"inputs": inputs}

    def keep(key: str, fn) -> None:
        if key not in results:
            log(f"eval {key}")
            t0 = time.monotonic()
            results[key] = fn() | {"seconds": round(time.monotonic() - t0, 1)}
            path.write_text(json.dumps(results, indent=2) + "\n")

    for ctx, data in sorted(heldout.items()):
        for temp in TEMPERATURES:
            for alg, k in EVAL_RUNS:
                keep(
                    f"{alg}-{k}@t{temp:g}@{ctx}",
                    lambda a=alg, k=k, d=data, t=temp: evaluate_drafter(
                        out / "target", out / a, d, t, k, device
                    ),
                )
    shortest = heldout[min(heldout)]
    for alg, k in EVAL_RUNS:
        keep(
            f"{alg}-{k}@engine",
            lambda a=alg, k=k: engine_check(out, shortest, a, k, recipe),
        )
    keep("cost", lambda: forward_costs(out))
    return results


# The files of a model or held-out data folder an evaluation reads (it writes caches beside them).
EVAL_INPUTS = ("config.json", "model.safetensors", "sts.json", "data.pt")


def _fingerprint(folders: list[Path]) -> str:
    """A digest of the files an evaluation reads (weights, STS temperatures, held-out data)."""
    digest = hashlib.sha256()
    for folder in folders:
        for name in EVAL_INPUTS:
            if (folder / name).is_file():
                digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()[:16]


def engine_check(out: Path, data: Path, alg: str, k: int, recipe: Recipe) -> dict:
    """Greedy tau through the engine on the first prompts of each domain, next to the offline
    number for the same prompts."""
    from specserve.models.loader import load_model
    from specserve.speculative.checkpoint import load_drafter
    from specserve.speculative.handle import TargetHandle
    from specserve.train.evaluate import continuations, engine_accept_length, evaluate_sequences

    target, _ = load_model(out / "target")
    seqs, p, domains = continuations(target, data, 0.0)
    rows = [
        i
        for d in sorted(set(domains))
        for i in [j for j, x in enumerate(domains) if x == d][: recipe.engine_check_prompts]
    ]
    seqs = seqs[torch.tensor(rows)]
    prompts = [r[:p].tolist() for r in seqs]
    engine = engine_accept_length(out / "target", out / alg, alg, prompts, k, recipe.new_tokens)
    offline = evaluate_sequences(
        target, load_drafter(out / alg, TargetHandle.of(target)), alg, seqs, p, k, 0.0
    )
    return {
        "engine_tau": round(engine, 3),
        "offline_tau": round(offline.tau, 3),
        "prompts": len(rows),
    }


# Weights a drafter multiplies once per draft position (the Markov head's W1 is a lookup; fc and
# the context K/V projections run once per committed token).
PER_POSITION = (
    "layers.",
    "eh_proj",
    "markov_head.markov_w2",
    "markov_head.gate_proj",
    "markov_head.joint_proj",
    "confidence_head",
)


def forward_costs(out: Path) -> dict:
    """Multiply-accumulates per token of one forward (target) or one draft position."""
    from specserve.models.loader import load_model
    from specserve.speculative.checkpoint import load_drafter
    from specserve.speculative.handle import TargetHandle

    target, cfg = load_model(out / "target")
    v, h = cfg.vocab_size, cfg.hidden_size
    body = sum(p.numel() for n, p in target.named_parameters() if ".layers." in n)
    costs = {"target": body + v * h}
    for alg in ALGORITHMS:
        d = load_drafter(out / alg, TargetHandle.of(target))
        own = sum(p.numel() for n, p in d.named_parameters() if n.startswith(PER_POSITION))
        costs[alg] = own + v * h  # its own per-position weights and the shared LM head
    return costs | {f"target/{a}": round(costs["target"] / costs[a], 2) for a in ALGORITHMS}


# -- time estimates ----------------------------------------------------------------------------
def stage_estimates(recipe: Recipe, step_times: dict[str, Any], jobs: int = 2) -> dict[str, float]:
    """Seconds per stage from `--estimate`'s measured times (each a per-row or per-step cost
    `a + b * tokens`, fitted on two lengths). Stages it did not time are left out."""
    rates = step_times["rates"]

    def cost(name: str, tokens: float) -> float:
        a, b = rates[name]
        return a + b * tokens

    new = recipe.new_tokens
    train_rows = [
        (2 * n * 2, p + new) for n, p in zip(recipe.train_prompts, recipe.prompt_lens, strict=True)
    ]
    held_rows = [
        (n * 2, p + new) for n, p in zip(recipe.heldout_prompts, recipe.eval_lens, strict=True)
    ]
    t, w = recipe.target_train, recipe.target_warmup
    est = {
        "target": t["steps"] * t["batch_size"] * cost("target_row", t["seq_len"] + 1),
        "gen-data": sum(n * cost("gen_row", p) for n, p in train_rows + held_rows),
        "cache-target": sum(n * cost("forward_row", p) for n, p in train_rows),
    }
    if w:
        est["target-short"] = w["steps"] * w["batch_size"] * cost("target_row", w["seq_len"] + 1)
    rows = sum(n for n, _ in train_rows)
    mean_len = sum(n * p for n, p in train_rows) / rows
    per_alg = [
        recipe.drafter_steps[a] * recipe.drafter_batch * cost(f"{a}_row", mean_len)
        for a in ALGORITHMS
    ]
    est["drafters"] = max(max(per_alg), sum(per_alg) / jobs)
    # Every EVAL_RUNS drafter at both temperatures over every bucket, plus the continuations.
    est["evaluate"] = sum(
        n * (len(TEMPERATURES) * cost("gen_row", p) + len(EVAL_RUNS) * cost("eval_row", p))
        for n, p in held_rows
    )
    return {k: round(v, 1) for k, v in est.items()}


def _timed(fn, repeat: int = 1) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def _fit(short: tuple[int, float], long: tuple[int, float]) -> tuple[float, float]:
    """Per-unit cost a + b * tokens through two measured points (tokens, seconds)."""
    b = max(0.0, (long[1] - short[1]) / (long[0] - short[0]))
    return max(0.0, short[1] - b * short[0]), b


def measure_rates(recipe: Recipe, device: str = "cpu") -> dict[str, tuple[float, float]]:
    """Time full-size steps of the recipe's models on random tokens, one row at a time, at a
    short and the longest length: target training, generation (prefill + new tokens), one
    target forward (the state cache), each drafter's training step, and one evaluation run."""
    from specserve.config import ModelConfig
    from specserve.models.qwen3 import CausalLM
    from specserve.train.drafter import DrafterSpec, build_drafter, step_loss, target_states
    from specserve.train.evaluate import drafts_and_alpha
    from specserve.train.gendata import generate
    from specserve.train.loop import TrainConfig, make_optimizer
    from specserve.train.target import lm_loss

    vocab = recipe.vocab_size
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab}
    config |= {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}
    config |= recipe.model
    torch.manual_seed(0)
    target = CausalLM(ModelConfig.from_dict(config)).to(device)
    short, long = min(recipe.prompt_lens), recipe.long_len
    ids = {
        n: torch.randint(3, vocab, (1, n + recipe.new_tokens), device=device) for n in (short, long)
    }
    rates: dict[str, tuple[float, float]] = {}

    def per_token(name: str, fn, per=lambda n: 1) -> None:
        points = [
            (n + recipe.new_tokens, _timed(lambda n=n: fn(n)) / per(n)) for n in (short, long)
        ]
        rates[name] = _fit(*points)
        log(f"timed {name}: " + ", ".join(f"{s:.3f} s at {n} tokens" for n, s in points))

    opt = make_optimizer(list(target.parameters()), TrainConfig())

    def target_step(n: int) -> None:
        lm_loss(target, ids[n]).backward()
        opt.step(), opt.zero_grad()

    per_token("target_row", target_step)
    target.eval()
    with torch.no_grad():
        batches = {n: ids[n][:, :n].expand(gen_batch(n), -1) for n in ids}
        per_token(  # per row of a gen-data batch
            "gen_row",
            lambda n: generate(target, batches[n], recipe.new_tokens, 1.0),
            per=gen_batch,
        )
        per_token("forward_row", lambda n: target_states(target, ids[n], recipe.target_layer_ids))
    for alg in ALGORITHMS:
        spec = DrafterSpec(
            alg,
            block_size=7,
            anchors_per_seq=recipe.anchors,
            target_layer_ids=recipe.target_layer_ids,
        )
        drafter = build_drafter(spec, target, config).to(device).train()
        opt_d = make_optimizer([p for p in drafter.parameters() if p.requires_grad], TrainConfig())
        layers = (
            recipe.target_layer_ids if alg != "mtp" else (recipe.model["num_hidden_layers"] - 1,)
        )
        states = {n: target_states(target, ids[n], layers) for n in ids}

        def drafter_step(n: int, drafter=drafter, spec=spec, opt_d=opt_d, states=states) -> None:
            gen = torch.Generator().manual_seed(0)
            step_loss(drafter, target, ids[n], n, spec, gen, states[n]).total.backward()
            opt_d.step(), opt_d.zero_grad()

        per_token(f"{alg}_row", drafter_step)
        if alg == "dspark":
            drafter.eval()

            def eval_row(n: int, drafter=drafter) -> None:
                gen = torch.Generator().manual_seed(0)
                for temp in TEMPERATURES:
                    drafts_and_alpha(target, drafter, "dspark", ids[n], n, 7, temp, gen)

            per_token("eval_row", eval_row)
    return rates


def print_estimate(recipe: Recipe, work: Path, device: str = "cpu") -> dict[str, float]:
    """Measure, write `work/step_times.json`, print every stage's estimate and the total."""
    work.mkdir(parents=True, exist_ok=True)
    step_times = {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch_threads": torch.get_num_threads(),
        "rates": measure_rates(recipe, device),
    }
    (work / "step_times.json").write_text(json.dumps(step_times, indent=2) + "\n")
    est = stage_estimates(recipe, step_times)
    print(f"Estimated stage times (steps timed {step_times['measured']}, one thread each):")
    for stage, seconds in est.items():
        print(f"  {stage:14s} {seconds / 60:7.1f} min")
    print(
        f"  {'total':14s} {sum(est.values()) / 60:7.1f} min (corpus, tokenizer, prompts, "
        "position loss and calibration not timed: a few minutes)"
    )
    return est
