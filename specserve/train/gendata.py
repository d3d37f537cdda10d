"""Drafter training data: prompts, continued by the target itself.

A drafter should learn the target's distribution, not the corpus's, so every training (and
evaluation) sequence is `prompt + continuation sampled from the target`. Prompts are windows of
`prompt_len` tokens cut from corpus files (`make_prompts`, written as JSON lines with `domain`,
`token_ids` and `text`), or any JSON-lines file with a `text` field. `generate` is a batched
sampler over a fixed-size KV cache (all prompts of a batch have the same length).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from specserve.models.attention import AttentionContext
from specserve.models.loader import load_model
from specserve.train.data import corpus_files
from specserve.train.loop import Progress, write_json
from specserve.train.tokenizer import load_tokenizer


class StaticCache(AttentionContext):
    """K/V of B equal-length sequences in [B, max_len] buffers; `advance` after each forward."""

    def __init__(self, num_layers: int, batch: int, max_len: int, kv: int, d: int, device) -> None:
        shape = (num_layers, batch, max_len, kv, d)
        self.k = torch.zeros(shape, device=device)
        self.v = torch.zeros(shape, device=device)
        self.batch, self.length, self.new = batch, 0, 0

    def attend(self, layer_idx, q, k, v):
        b, n = self.batch, q.shape[0] // self.batch
        start, end = self.length, self.length + n
        self.k[layer_idx, :, start:end] = k.view(b, n, *k.shape[1:])
        self.v[layer_idx, :, start:end] = v.view(b, n, *v.shape[1:])
        self.new = n
        keys = self.k[layer_idx, :, :end].transpose(1, 2)
        vals = self.v[layer_idx, :, :end].transpose(1, 2)
        mask = (
            torch.arange(end, device=q.device)[None, :]
            <= start + torch.arange(n, device=q.device)[:, None]
        )
        out = F.scaled_dot_product_attention(
            q.view(b, n, *q.shape[1:]).transpose(1, 2), keys, vals, attn_mask=mask, enable_gqa=True
        )
        return out.transpose(1, 2).reshape(b * n, *q.shape[1:])

    def advance(self) -> None:
        self.length += self.new


def sample(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [B, V] -> tokens [B]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def generate(
    model, prompts: torch.Tensor, max_new_tokens: int, temperature: float, seed: int = 0
) -> torch.Tensor:
    """prompts [B, P] -> [B, P + max_new_tokens] (no early stop: every row has the same length)."""
    cfg = model.config
    b, p = prompts.shape
    dev = prompts.device
    cache = StaticCache(
        cfg.num_hidden_layers, b, p + max_new_tokens, cfg.num_key_value_heads, cfg.head_dim, dev
    )
    gen = torch.Generator().manual_seed(seed)
    seq, ids = prompts, prompts.reshape(-1)
    positions = torch.arange(p, device=dev).repeat(b)
    for _ in range(max_new_tokens):
        out = model(ids, positions, cache)
        cache.advance()
        last = out.hidden.view(b, -1, out.hidden.shape[-1])[:, -1]
        nxt = sample(model.compute_logits(last), temperature, gen)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        ids, positions = nxt, torch.full((b,), seq.shape[1] - 1, device=dev)
    return seq


def make_prompts(
    corpora: list[str | Path],
    tokenizer_dir: str | Path,
    split: str,
    per_corpus: int,
    prompt_len: int,
    out: str | Path,
    seed: int = 0,
    whole_files: bool = False,
) -> int:
    """Write `per_corpus` prompts per corpus as JSON lines (`domain`, `token_ids`, `text`,
    `source`): windows of `prompt_len` tokens at random offsets of random files of the split, or
    with `whole_files` the first `prompt_len` tokens of distinct files long enough to hold them
    (long-context prompts: one file each, never snippets joined). Returns how many were written."""
    tok = load_tokenizer(tokenizer_dir)
    rng = random.Random(seed)
    lines = []
    for corpus in corpora:
        root = Path(corpus)
        files = corpus_files(corpus, split)
        rng.shuffle(files)
        made = 0
        for f in files if whole_files else files * 4:  # several windows per file if few files
            ids = tok.encode(f.read_text(encoding="utf-8", errors="replace")).ids
            if len(ids) < prompt_len + (0 if whole_files else 8):
                continue
            start = 0 if whole_files else rng.randrange(0, len(ids) - prompt_len)
            window = ids[start : start + prompt_len]
            lines.append(
                {
                    "domain": root.name,
                    "token_ids": window,
                    "text": tok.decode(window),
                    "source": f.relative_to(root).as_posix(),
                }
            )
            made += 1
            if made == per_corpus:
                break
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(x) + "\n" for x in lines))
    return len(lines)


def read_prompts(path: str | Path, tokenizer, prompt_len: int) -> tuple[torch.Tensor, list[str]]:
    """JSON lines with `token_ids` or `text` (+ optional `domain`) -> [N, prompt_len], domains.
    Longer prompts keep their last `prompt_len` tokens; shorter ones are skipped."""
    rows, domains = [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            ids = item.get("token_ids") or tokenizer.encode(item["text"]).ids
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(
                f"{path}:{n}: expected a JSON object with 'token_ids' or 'text'"
            ) from None
        if len(ids) >= prompt_len:
            rows.append(ids[-prompt_len:])
            domains.append(str(item.get("domain", "default")))
    if not rows:
        raise ValueError(f"{path}: no prompt has {prompt_len} tokens or more")
    return torch.tensor(rows, dtype=torch.long), domains


def generate_dataset(
    target_dir: str | Path,
    prompts_file: str | Path,
    out: str | Path,
    prompt_len: int = 64,
    max_new_tokens: int = 96,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    resume: bool = True,
) -> dict[str, Any]:
    """Continue every prompt with the target; writes `out/data.pt` and `out/meta.json`.

    Finished batches are kept in `out/partial.pt`, so an interrupted run resumes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = load_model(target_dir, device=device)
    prompts, domains = read_prompts(prompts_file, load_tokenizer(target_dir), prompt_len)
    partial = out / "partial.pt"
    done: list[torch.Tensor] = torch.load(partial) if resume and partial.is_file() else []
    bar = Progress(-(-len(prompts) // batch_size), len(done), "gen-data")
    for i in range(len(done) * batch_size, len(prompts), batch_size):
        seqs = generate(
            model, prompts[i : i + batch_size].to(device), max_new_tokens, temperature, seed + i
        )
        done.append(seqs.cpu().to(torch.int32))
        torch.save(done, partial)
        bar.update(seqs.shape[0] * max_new_tokens)
    bar.close()
    data = {"input_ids": torch.cat(done), "prompt_len": prompt_len, "domains": domains}
    torch.save(data, out / "data.pt")
    partial.unlink(missing_ok=True)
    meta = {
        "target": str(Path(target_dir).resolve()),
        "prompts": str(prompts_file),
        "num_sequences": len(domains),
        "prompt_len": prompt_len,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
    }
    write_json(out / "meta.json", meta)
    return meta


def load_dataset(data_dir: str | Path | list[str | Path], pad: bool = False) -> dict[str, Any]:
    """`data.pt` of a `generate_dataset` folder: input_ids [N, T] int32, prompt_len, domains,
    and per row `prompt_lens` and `lengths` [N]. Several folders (e.g. sampled and greedy
    continuations) are pooled; their prompt and sequence lengths must agree, unless `pad`:
    then shorter rows are right-padded with 0 (drafter data of several prompt lengths;
    `prompt_len` is then the shortest)."""
    if isinstance(data_dir, (list, tuple)):
        parts = [load_dataset(d) for d in data_dir]
        shapes = {(p["prompt_len"], p["input_ids"].shape[1]) for p in parts}
        if len(shapes) > 1 and not pad:
            raise ValueError(
                f"data folders {[str(d) for d in data_dir]} differ in (prompt_len, seq_len): "
                f"{sorted(shapes)}"
            )
        width = max(t for _, t in shapes)
        return {
            "input_ids": torch.cat(
                [F.pad(p["input_ids"], (0, width - p["input_ids"].shape[1])) for p in parts]
            ),
            "prompt_len": min(p for p, _ in shapes),
            "domains": [d for p in parts for d in p["domains"]],
            "prompt_lens": torch.cat([p["prompt_lens"] for p in parts]),
            "lengths": torch.cat([p["lengths"] for p in parts]),
        }
    path = Path(data_dir) / "data.pt"
    if not path.is_file():
        raise ValueError(f"{data_dir}: no data.pt (run `specserve train gen-data` first)")
    data = torch.load(path)
    n, t = data["input_ids"].shape
    return data | {
        "prompt_lens": torch.full((n,), int(data["prompt_len"])),
        "lengths": torch.full((n,), t),
    }


def dataset_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}
