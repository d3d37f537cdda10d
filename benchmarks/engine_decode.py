"""Plain decode speed of our engine vs Hugging Face transformers, measured side by side.

    .venv/bin/python benchmarks/engine_decode.py [--sizes 10m,150m] [--tokens 128]

For each model size (a random Qwen3 checkpoint written to a temp folder) it prints:
  * greedy decode tok/s at batch 1, ours vs `transformers` `generate`, and the ratio;
  * our decode step time against the floor `weight bytes / copy bandwidth`;
  * total tok/s at batch 1, 8, 32 (10M model) and the scaling ratio;
  * the time of one forward over 1, 8 and 16 tokens of one request at KV length 512.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from specserve.core import SamplingParams
from specserve.engine.model_runner import BatchSeq
from specserve.llm import LLM
from specserve.models.tiny import make_checkpoint

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


def copy_bandwidth() -> float:
    """Bytes per second of a large tensor copy (read + write counted once each)."""
    a = torch.empty(64 * 1024 * 1024 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    dt = (time.perf_counter() - t) / 10
    return 2 * a.numel() * 4 / dt


def ours_decode(path: str, batch: int, tokens: int) -> float:
    llm = LLM(
        path,
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


def hf_decode(path: str, tokens: int) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([[(7 * j) % 1000 + 3 for j in range(16)]])
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
    return tokens / (time.perf_counter() - t)


def forward_times(path: str, widths=(1, 8, 16), kv_len: int = 512) -> dict[int, float]:
    llm = LLM(path, max_total_tokens=4096, page_size=16)
    runner = llm.engine.runner
    blocks = list(range(-(-(kv_len + max(widths)) // 16)))
    prefix = [(j * 13) % 1000 + 3 for j in range(kv_len)]
    runner.forward([BatchSeq(prefix, 0, blocks, kv_len)])
    out = {}
    for w in widths:
        toks = [5] * w
        runner.forward([BatchSeq(toks, kv_len, blocks, 0)])
        reps = 20
        t = time.perf_counter()
        for _ in range(reps):
            runner.forward([BatchSeq(toks, kv_len, blocks, 0)])
        out[w] = (time.perf_counter() - t) / reps
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10m,150m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (both sides)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s, torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            path = str(make_checkpoint(f"{tmp}/{size}", **SIZES[size]))
            llm = LLM(path, max_total_tokens=1024)
            n_params = sum(p.numel() for p in llm.engine.model.parameters())
            weight_bytes = n_params * 4
            del llm
            print(f"\n== {size}: {n_params / 1e6:.1f}M parameters, fp32")
            ours = ours_decode(path, 1, args.tokens)
            hf = hf_decode(path, args.tokens)
            print(
                f"batch-1 greedy decode: ours {ours:.1f} tok/s, transformers {hf:.1f} tok/s, "
                f"ratio {ours / hf:.2f}x"
            )
            floor = weight_bytes / bw
            print(
                f"step time {1e3 / ours:.2f} ms vs floor weight bytes / copy bandwidth "
                f"{1e3 * floor:.2f} ms ({floor * ours:.2f} of the floor speed)"
            )
            if size == "10m":
                tput = {b: ours_decode(path, b, args.tokens) for b in (1, 8, 32)}
                print(
                    "batched decode tok/s: "
                    + ", ".join(f"b{b} {v:.0f}" for b, v in tput.items())
                    + f"; b32/b1 = {tput[32] / tput[1]:.1f}x, b8/b1 = {tput[8] / tput[1]:.1f}x"
                )
            ft = forward_times(path)
            print(
                "one forward at KV 512: "
                + ", ".join(f"{w} tok {1e3 * t:.2f} ms" for w, t in ft.items())
                + f"; 8/1 = {ft[8] / ft[1]:.2f}x, 16/1 = {ft[16] / ft[1]:.2f}x"
            )


if __name__ == "__main__":
    main()
