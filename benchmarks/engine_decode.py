"""Engine speed against its floor and against `transformers`, measured side by side.

    .venv/bin/python benchmarks/engine_decode.py [--models demo,150m] [--quick] [--threads 1]
        [--pages contiguous|interleaved] [--checkpoint-dtype bfloat16|float16|float32]
        [--attention-backends torch,cpp,cpp:bfloat16]

For each model (`demo` = models/demo/target, saved in float16; `10m`/`150m` = random Qwen3
checkpoints written to a temp folder in `--checkpoint-dtype`, bfloat16 by default as Qwen3
ships) it prints:
  * greedy decode tok/s at batch 1, ours vs `transformers` `generate` in float32 (the same
    arithmetic as ours) and in the checkpoint's dtype, and the ratios;
  * a grid batch {1, 10, 32} x context {64, 1024, 2048} x step {decode, verify 4, verify 8,
    prefill chunk 512} (`--quick`: batch {1, 10} x context {1024} x {decode, verify 8}). Each
    cell is one target forward through `ModelRunner` on a cache filled with random K/V (the
    step's cost depends on shapes, not values): its time, its floor (the larger of two: the
    bytes the step must read, weights plus every request's K/V, over the best bandwidth of a
    copy with the same footprint, so the same cache level; and its FLOPs, products and
    attention, over the best rate of a float32 `torch.mm` from cache; both sampled between the
    cell's timings), the ratio to the larger floor, and `transformers` running one forward
    over the same tokens on a `DynamicCache` of the same length. Arms alternate, and each step
    is timed right after an untimed one, as a server runs its steps back to back (not right
    after another arm has filled the caches with its data); min and median of `--reps`.
    Requests' contexts differ by a few tokens on our side (as in serving), all equal on the
    `transformers` side. "prefill 512" is one request's 512-token chunk after the context
    while the others decode. Each request's pages are one run (`--pages contiguous`, as after
    a prefill) or taken in turns (`--pages interleaved`, as when requests decoding together
    each take their next page).
  * with `--profile`, torch ops per decode step and the share of the step spent outside them.
Our arms are `--attention-backends`, each `NAME[:KV_CACHE_DTYPE]` (`cpp:bfloat16`: the cpp
backend over a bfloat16 K/V cache, `--kv-cache-dtype bfloat16`); the floor columns are the
first arm's, and each arm's ratio is to its own floor (a 16-bit cache has fewer bytes to read).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import profile

from specserve.config import CacheConfig
from specserve.core import SamplingParams
from specserve.engine.model_runner import BatchSeq, ModelRunner
from specserve.llm import LLM
from specserve.models.loader import load_model
from specserve.testing.tiny import make_checkpoint

SIZES = {
    # ~10M parameters: bound by per-layer overhead
    "10m": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    ),
    # ~150M parameters: bound by how fast the weights stream through memory
    "150m": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=16,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
    ),
}
DEMO_TARGET = Path(__file__).resolve().parent.parent / "models" / "demo" / "target"
PAGE = 16


@functools.lru_cache(maxsize=2)
def _copy_buffers(nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.zeros(nbytes // 4)
    return a, torch.zeros_like(a)


def copy_bandwidth(footprint: int = 64 << 20) -> float:
    """Bytes per second of a tensor copy (read + write counted once each) whose two buffers
    together take `footprint` bytes (at least 32 MiB), the bytes the measured step reads: a
    step whose weights and K/V fit in the last-level cache is held to that cache's bandwidth,
    one that streams from DRAM to DRAM's (a host with a 480 MB L3 copies 64 MB at 42 GB/s and
    600 MB at 17.5)."""
    a, b = _copy_buffers(max(footprint // 2, 16 << 20) // 4096 * 4096)
    b.copy_(a)
    reps = max(2, min(10, (640 << 20) // a.nbytes))
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    dt = (time.perf_counter() - t) / reps
    return 2 * a.nbytes / dt


@functools.lru_cache(maxsize=1)
def _product_operands() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(256, 1024), torch.randn(1024, 1024)


def peak_flops(reps: int = 5) -> float:
    """FLOP/s of a float32 product that runs from cache (`torch.mm` of [256, 1024] x [1024,
    1024], 0.5 GFLOP, the best of `reps`, on the run's threads): what a tuned BLAS gets from
    these cores, the compute floor's rate."""
    a, b = _product_operands()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best


def arm(backend: str) -> tuple[str, str]:
    """`NAME[:KV_CACHE_DTYPE]` -> the attention backend and `--kv-cache-dtype` (auto)."""
    name, _, kv = backend.partition(":")
    return name, kv or "auto"


def ours_decode(path: str, batch: int, tokens: int, backend: str) -> float:
    name, kv = arm(backend)
    llm = LLM(
        path,
        attention_backend=name,
        kv_cache_dtype=kv,
        max_total_tokens=max(4096, batch * (tokens + 64)),
        page_size=16,
        max_running_requests=max(batch, 1),
    )
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    prompts = [[(7 * i + j) % 1000 + 3 for j in range(16)] for i in range(batch)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    t = time.perf_counter()
    llm.generate(prompts, params)
    return batch * tokens / (time.perf_counter() - t)


def hf_decode(path: str, tokens: int, dtype: torch.dtype = torch.float32) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.tensor([[(7 * j) % 1000 + 3 for j in range(16)]])
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
    return tokens / (time.perf_counter() - t)


STEPS = {"decode": 1, "verify 4": 4, "verify 8": 8, "prefill 512": 512}


class Cell:
    """One grid cell: B requests with about `context` cached tokens each and one step kind."""

    def __init__(
        self, path: str, batch: int, context: int, step: str, interleaved: bool = False
    ) -> None:
        self.width = STEPS[step]
        self.interleaved = interleaved
        # a context the model has positions for (today's demo target stops at 2,048)
        limit = json.loads((Path(path) / "config.json").read_text())["max_position_embeddings"]
        self.batch, self.context, self.step = batch, min(context, limit - self.width), step
        self.contexts = [max(1, self.context - i % 8) for i in range(batch)]
        self.queries = [1 if step == "prefill 512" and i else self.width for i in range(batch)]
        self.path = path

    def ours(self, backend: str = "torch") -> tuple[ModelRunner, list[BatchSeq]]:
        model, _ = load_model(self.path)
        model.fuse()
        per = -(-(self.context + self.width) // PAGE)
        name, kv = arm(backend)
        kv_dtype = CacheConfig(kv_cache_dtype=kv).kv_dtype(torch.float32)
        runner = ModelRunner(
            model, self.batch * per, PAGE, torch.float32, "cpu", (), name, kv_dtype
        )
        for layer in runner.kv_cache:
            layer.normal_()

        def table(i: int) -> list[int]:  # interleaved: the requests took turns per page
            if self.interleaved:
                return [p * self.batch + i for p in range(per)]
            return list(range(i * per, (i + 1) * per))

        seqs = [
            BatchSeq([5] * q, c, table(i), q - 1 if q > 8 else 0)
            for i, (c, q) in enumerate(zip(self.contexts, self.queries, strict=True))
        ]
        return runner, seqs

    def bytes_read(self, runner: ModelRunner) -> int:
        """Weights as the step reads them (the fused step's tiled copies, 16-bit where that is
        exact, and the LM head's; else the parameters, the embedding only by the rows it reads)
        plus the K/V every query sees."""
        model = runner.model
        if model._step_weights is not None:
            head = getattr(model.lm_head.weight, "tiled", model.lm_head.weight)
            tensors = [*model._step_weights, model.model.norm.weight, head]
            weights = sum(t.numel() * t.element_size() for t in tensors)
        else:
            embed = model.model.embed_tokens.weight
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            if model.lm_head.weight is not embed:
                weights -= embed.numel() * embed.element_size()
        cache = runner.kv_cache[0]
        per_token = cache[0, :, 0, 0].numel() * 2 * cache.element_size() * len(runner.kv_cache)
        return weights + per_token * sum(
            c + q for c, q in zip(self.contexts, self.queries, strict=True)
        )

    def flops(self, runner: ModelRunner) -> float:
        """The step's floating-point work: 2 per multiply-add of every decoder-layer weight for
        each query row and of the LM head for each row whose logits the step computes, plus
        attention (q.k and p.v: 4 x heads x head size per key a query sees, per layer)."""
        model = runner.model
        cfg = model.config
        layers = sum(p.numel() for p in model.model.layers.parameters())
        rows = sum(self.queries)
        logit_rows = sum(1 if q > 8 else q for q in self.queries)  # `BatchSeq.logits_from`
        keys = sum(
            q * c + q * (q + 1) // 2 for c, q in zip(self.contexts, self.queries, strict=True)
        )
        per_key = 4 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
        return 2.0 * (rows * layers + logit_rows * model.lm_head.weight.numel()) + per_key * keys

    def hf(self):
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            self.path, dtype=torch.float32
        ).eval()
        cfg = model.config
        cache = transformers.DynamicCache()
        shape = (self.batch, cfg.num_key_value_heads, self.context, cfg.head_dim)
        for layer in range(cfg.num_hidden_layers):
            cache.update(torch.randn(shape), torch.randn(shape), layer)
        if self.step == "prefill 512":  # one request's chunk; the others' decode is separate
            runs = [(1, 512), (self.batch - 1, 1)] if self.batch > 1 else [(1, 512)]
        else:
            runs = [(self.batch, self.width)]

        def step() -> None:
            for b, q in runs:
                c = transformers.DynamicCache()
                for layer in range(cfg.num_hidden_layers):
                    k, v = cache.layers[layer].keys[:b], cache.layers[layer].values[:b]
                    c.update(k, v, layer)
                model(
                    torch.full((b, q), 5),
                    past_key_values=c,
                    attention_mask=torch.ones(b, self.context + q, dtype=torch.long),
                    logits_to_keep=1,
                )

        return step


def checkpoint_dtype(path: str) -> torch.dtype:
    name = json.loads((Path(path) / "config.json").read_text()).get("torch_dtype", "float32")
    return getattr(torch, name)


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


@torch.inference_mode()
def run_cell(cell: Cell, reps: int, with_hf: bool, backends: list[str]) -> str:
    """Arms (each attention backend, then `transformers`) alternated with a copy-bandwidth
    sample each round (the load on a shared machine moves); the floor uses the best bandwidth
    seen, each ratio the best step time."""
    arms, runners = [], []
    for b in backends:
        runner, seqs = cell.ours(b)
        runners.append(runner)
        arms.append(lambda r=runner, s=seqs: r.forward(s))
    if with_hf:
        arms.append(cell.hf())
    for fn in arms:
        fn()
    times: list[list[float]] = [[] for _ in arms]
    bws, peaks = [], []
    for _ in range(reps):
        for fn, t in zip(arms, times, strict=True):
            fn()  # back to back, as a server runs its steps: not after another arm's data
            t += timed(fn, 1)
        bws.append(copy_bandwidth(cell.bytes_read(runners[0])))
        peaks.append(peak_flops())
    floor_flops = cell.flops(runners[0]) / max(peaks)
    floors = [max(cell.bytes_read(r) / max(bws), floor_flops) for r in runners]
    floor_bytes = cell.bytes_read(runners[0]) / max(bws)
    line = (
        f"| {cell.batch} | {cell.context} | {cell.step} | {max(bws) / 1e9:.1f} | "
        f"{max(peaks) / 1e9:.0f} | {1e3 * floor_bytes:.2f} | {1e3 * floor_flops:.2f} |"
    )
    for t, floor in zip(times[: len(backends)], floors, strict=True):
        line += f" {1e3 * min(t):.2f} / {1e3 * statistics.median(t):.2f} | {min(t) / floor:.1f}x |"
    if with_hf:
        best = min(min(t) for t in times[: len(backends)])
        h = times[-1]
        line += f" {1e3 * min(h):.2f} / {1e3 * statistics.median(h):.2f} | {min(h) / best:.2f}x |"
    return line


def op_profile(cell: Cell, backend: str, steps: int = 5) -> str:
    """Top-level torch ops per step and the share of wall time outside them (Python)."""
    runner, seqs = cell.ours(backend)
    runner.forward(seqs)
    t = time.perf_counter()
    with profile() as prof:
        for _ in range(steps):
            runner.forward(seqs)
    wall = time.perf_counter() - t
    top = [
        e for e in prof.events() if e.cpu_parent is None and "::" in e.name
    ]  # aten, mkldnn, ours
    in_ops = sum(e.cpu_time_total for e in top) / 1e6
    return (
        f"profile {backend} b{cell.batch} ctx{cell.context} {cell.step}: "
        f"{len(top) / steps:.0f} ops/step, "
        f"{1 - in_ops / wall:.0%} of the (profiled) step outside torch ops"
    )


def model_path(name: str, tmp: str, dtype: torch.dtype) -> str:
    if name == "demo":
        return str(DEMO_TARGET)
    return str(make_checkpoint(f"{tmp}/{name}", dtype=dtype, **SIZES[name]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="demo,150m")
    ap.add_argument("--quick", action="store_true", help="batch 1, 10 x context 1024 only")
    ap.add_argument("--tokens", type=int, default=128, help="batch-1 generate length")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    ap.add_argument("--reps", type=int, default=5, help="alternated timings per arm and cell")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers in the grid")
    ap.add_argument("--profile", action="store_true", help="ops per decode step")
    ap.add_argument(
        "--checkpoint-dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="how the random models are saved (Qwen3 ships bfloat16); both engines compute in "
        "float32, and `transformers` also runs in this dtype",
    )
    ap.add_argument(
        "--pages",
        choices=("contiguous", "interleaved"),
        default="contiguous",
        help="each request's pages in one run, or taken in turns (requests decoding together)",
    )
    ap.add_argument(
        "--attention-backends", default="torch,cpp", help="ours: one arm per backend, side by side"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backends = args.attention_backends.split(",")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' cache argument
    batches, contexts = ((1, 10), (1024,)) if args.quick else ((1, 10, 32), (64, 1024, 2048))
    steps = ("decode", "verify 8") if args.quick else tuple(STEPS)
    print(f"torch threads: {torch.get_num_threads()}, pages: {args.pages}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = model_path(name, tmp, getattr(torch, args.checkpoint_dtype))
            saved = checkpoint_dtype(path)
            model, _ = load_model(path)
            n_params = sum(p.numel() for p in model.parameters())
            del model
            print(
                f"\n== {name}: {n_params / 1e6:.1f}M parameters, saved in {saved}, computed in "
                "float32 (the cpp backend reads 16-bit weights where they are exact)"
            )
            peers = [torch.float32] + ([saved] if saved != torch.float32 else [])
            for _ in range(2):  # A B A B
                hf = {dt: hf_decode(path, args.tokens, dt) for dt in peers}
                for b in backends:
                    ours = ours_decode(path, 1, args.tokens, b)
                    line = f"batch-1 greedy decode: ours ({b}) {ours:.1f} tok/s"
                    for dt, tps in hf.items():
                        line += f"; transformers {dt} {tps:.1f} tok/s, ratio {ours / tps:.2f}x"
                    print(line, flush=True)
            if args.profile:
                for b in backends:
                    print(op_profile(Cell(path, 10, 1024, "decode"), b))
            head = (
                "| batch | context | step | copy GB/s | GFLOP/s | floor ms, bytes | "
                "floor ms, FLOPs |"
            )
            for b in backends:
                head += f" {b} ms min / median | {b} / floor |"
            if not args.no_hf:
                head += " transformers ms min / median | transformers / best ours |"
            print(head)
            print("|---" * (head.count("|") - 1) + "|")
            for b in batches:
                for c in contexts:
                    for st in steps:
                        cell = Cell(path, b, c, st, args.pages == "interleaved")
                        print(run_cell(cell, args.reps, not args.no_hf, backends), flush=True)


if __name__ == "__main__":
    main()
