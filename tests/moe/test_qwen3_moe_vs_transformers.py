"""Our Qwen3-MoE against transformers.Qwen3MoeForCausalLM on random tiny checkpoints."""

from __future__ import annotations

import pytest
import torch
import transformers

from specserve.engine.model_runner import BatchSeq, ModelRunner
from specserve.models.attention import CausalAttention
from specserve.models.loader import load_model
from specserve.models.qwen3 import GatedMLP
from specserve.models.qwen3_moe import SparseMoeBlock, make_mlp
from specserve.testing.tiny import make_checkpoint


def _hf(path: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    return model


def _prefill_error(path: str) -> float:
    ours, _ = load_model(path)
    ours.fuse()
    ref = _hf(path)
    ids = torch.randint(0, 512, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        out = ours(ids.reshape(-1), torch.arange(29).repeat(2), CausalAttention(2, 29))
        got = ours.compute_logits(out.hidden).view(2, 29, -1)
    assert want.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    return (got - want).abs().max().item()


def test_prefill_logits_match(tiny_moe_path):
    assert _prefill_error(tiny_moe_path) <= 1e-4


@pytest.mark.parametrize(
    "overrides",
    [
        {"norm_topk_prob": False, "num_experts_per_tok": 3},
        {"decoder_sparse_step": 2, "num_hidden_layers": 4},  # layers 1 and 3 sparse
    ],
)
def test_routing_variants_match(tmp_path, overrides):
    path = make_checkpoint(
        tmp_path / "m", seed=5, init_std=0.05, model_type="qwen3_moe", **overrides
    )
    assert _prefill_error(str(path)) <= 1e-4


def test_sparse_layer_rule(tiny_moe_path):
    ours, cfg = load_model(tiny_moe_path)
    kinds = [type(layer.mlp) for layer in ours.model.layers]
    assert kinds == [GatedMLP, SparseMoeBlock, SparseMoeBlock]
    # a drafter config with MoE fields gets the same MLPs from make_mlp
    assert isinstance(make_mlp(cfg, 1), SparseMoeBlock) and isinstance(make_mlp(cfg, 0), GatedMLP)


def test_paged_decode_logits_match(tiny_moe_path):
    """Chunked prefill then one-token decode through the paged cache equals HF's logits."""
    ours, _ = load_model(tiny_moe_path)
    ours.fuse()
    ref = _hf(tiny_moe_path)
    runner = ModelRunner(ours, num_blocks=16, page_size=4, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got, pos = [], 0
    for n in (9, 7, 1, 1, 1, 1, 1, 1, 1, 1):
        got.append(runner.forward([BatchSeq(ids[pos : pos + n], pos, list(range(8)), 0)]).logits)
        pos += n
    assert (torch.cat(got) - want[:pos]).abs().max().item() <= 1e-4
