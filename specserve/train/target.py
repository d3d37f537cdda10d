"""Pre-train a small target LM (our Qwen3 class) on the corpora; save it in Hugging Face format.

The run config is one JSON file: `{"model": {Hugging Face config fields}, "train": {TrainConfig
fields}, "max_bytes_per_corpus": N}`. Sequences are packed documents of every corpus's train
split, mixed and shuffled with the run's seed; step s always reads the same rows, so a resumed
run sees exactly the data an uninterrupted one would, with any number of processes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from specserve.config import DTYPES, ModelConfig
from specserve.models.attention import CausalAttention
from specserve.models.qwen3 import CausalLM
from specserve.train.data import corpus_files, pack, read_texts, tokenize
from specserve.train.loop import TrainConfig, fit, write_json
from specserve.train.parallel import World
from specserve.train.tokenizer import load_tokenizer

DEFAULT_MAX_BYTES = 8 << 20


def model_config_dict(model: dict[str, Any], tokenizer) -> dict[str, Any]:
    """A complete Qwen3 `config.json` from the run config's model fields."""
    cfg = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": tokenizer.get_vocab_size(),
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": [
            tokenizer.token_to_id("<|endoftext|>"),
            tokenizer.token_to_id("<|im_end|>"),
        ],
    }
    cfg.update(model)
    return cfg


def token_rows(
    corpora: list[str | Path], tokenizer, split: str, seq_len: int, max_bytes: int, seed: int
) -> torch.Tensor:
    """Packed [n, seq_len] rows of a split of every corpus, shuffled with `seed`."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    rows = []
    for corpus in corpora:
        files = corpus_files(corpus, split)
        random.Random(seed).shuffle(files)  # a varied sample when max_bytes cuts the list
        rows.append(pack(tokenize(read_texts(files, max_bytes), tokenizer, eos), seq_len))
    allrows = torch.cat(rows)
    perm = torch.randperm(len(allrows), generator=torch.Generator().manual_seed(seed))
    return allrows[perm]


def lm_loss(model: CausalLM, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a [B, T] batch."""
    b, t = batch.shape
    x = batch[:, :-1].reshape(-1)
    pos = torch.arange(t - 1, device=batch.device).repeat(b)
    out = model(x, pos, CausalAttention(b, t - 1))
    return F.cross_entropy(model.compute_logits(out.hidden), batch[:, 1:].reshape(-1).long())


def save_hf(
    model: CausalLM, config: dict[str, Any], out: str | Path, dtype: str = "float32"
) -> None:
    """config.json + model.safetensors (weights cast to `dtype`; they load back to any dtype)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()
    }
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config | {"torch_dtype": dtype}, indent=2) + "\n")


def copy_tokenizer(src: str | Path, out: str | Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (Path(out) / name).write_bytes((Path(src) / name).read_bytes())


@torch.no_grad()
def heldout_loss(model: CausalLM, rows: torch.Tensor, batch_size: int, device: str) -> float:
    losses = [
        lm_loss(model, rows[i : i + batch_size].to(device)).item()
        for i in range(0, len(rows), batch_size)
    ]
    return sum(losses) / max(1, len(losses))


def train_target(
    corpora: list[str | Path],
    tokenizer_dir: str | Path,
    run_config: dict[str, Any],
    out: str | Path,
    resume: bool = False,
    device: str = "cpu",
    save_dtype: str = "float32",
    world: World = World(),
) -> dict[str, Any]:
    """Train and save the target; returns the run summary also written to `out/train_log.json`.
    Under torchrun (`world`) every rank runs its share of each global batch; rank 0 saves."""
    out = Path(out)
    tokenizer = load_tokenizer(tokenizer_dir)
    tcfg = TrainConfig.from_dict(run_config.get("train", {}))
    config = model_config_dict(run_config.get("model", {}), tokenizer)
    max_bytes = int(run_config.get("max_bytes_per_corpus", DEFAULT_MAX_BYTES))
    torch.manual_seed(tcfg.seed)
    model = CausalLM(ModelConfig.from_dict(config))
    if run_config.get("init"):  # a curriculum's next phase starts from the last one's weights
        _load_weights(model, Path(run_config["init"]))
    else:
        _init_weights(model)
    model.to(device).train()
    rows = token_rows(corpora, tokenizer, "train", tcfg.seq_len + 1, max_bytes, tcfg.seed)

    def rows_of_step(step: int) -> torch.Tensor:
        return rows[torch.arange(step * tcfg.batch_size, (step + 1) * tcfg.batch_size) % len(rows)]

    def loss_fn(batch: torch.Tensor, _gen: torch.Generator):
        loss = lm_loss(model, batch.to(device))
        return loss, {"loss": loss}

    log, elapsed = fit(
        model, loss_fn, rows_of_step, tcfg, out, world, resume, device, "target", tcfg.seq_len
    )
    summary = {
        "params": sum(p.numel() for p in model.parameters()),
        "train_tokens": tcfg.steps * tcfg.batch_size * tcfg.seq_len,
        "train_seconds": round(elapsed, 1),
        "processes": world.size,
        "train": tcfg,
        "log": log,
    }
    if not world.main:
        return summary
    model.eval()
    held = {}
    for corpus in corpora:
        rows_h = token_rows([corpus], tokenizer, "heldout", tcfg.seq_len + 1, 1 << 20, 0)[:32]
        held[Path(corpus).name] = round(heldout_loss(model, rows_h, tcfg.batch_size, device), 4)
    save_hf(model, config, out, save_dtype)
    copy_tokenizer(tokenizer_dir, out)
    summary = summary | {"heldout_loss": held}
    write_json(out / "train_log.json", summary)
    return summary


def check_init(run_config: dict[str, Any], tokenizer_dir: str | Path) -> None:
    """Raise ValueError unless `run_config["init"]` holds weights of the configured model."""
    config = model_config_dict(run_config.get("model", {}), load_tokenizer(tokenizer_dir))
    _load_weights(CausalLM(ModelConfig.from_dict(config)), Path(run_config["init"]))


def _load_weights(model: CausalLM, folder: Path) -> None:
    """Weights saved by `save_hf` (same architecture; a tied LM head is not stored)."""
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"--init-from {folder}: no model.safetensors there")
    try:
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    except RuntimeError as e:  # shapes differ
        raise ValueError(f"--init-from {folder}: the weights do not fit the model ({e})") from None
    tied = model.config.tie_word_embeddings
    if unexpected or [k for k in missing if not (tied and k == "lm_head.weight")]:
        bad = missing or unexpected
        raise ValueError(f"--init-from {folder}: the weights do not fit the model: {bad}")


def _init_weights(model: CausalLM, std: float = 0.02) -> None:
    """GPT-style init: normal(0, std) for matrices, output projections scaled by depth."""
    depth = len(model.model.layers)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            scale = (
                (2 * depth) ** -0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            )
            torch.nn.init.normal_(p, 0.0, std * scale)
