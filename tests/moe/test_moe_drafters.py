"""Drafters of a MoE target get MoE layers (as the seed's DSpark drafter has) and stay lossless,
with torch or MXFP4 experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specserve.config import SpecConfig
from specserve.core import SamplingParams
from specserve.llm import LLM
from specserve.models.qwen3_moe import SparseMoeBlock, set_moe_backend
from specserve.speculative.checkpoint import new_drafter, save_drafter
from specserve.speculative.factory import build_speculation

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [20, 21, 22], list(range(40, 70))]
PARAMS = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("algorithm", ["NEXTN", "DFLASH"])
@pytest.mark.parametrize("experts", ["torch", "mxfp4"])
def test_moe_drafter_is_lossless(tiny_moe_path, tmp_path, algorithm, experts):
    raw = json.loads((Path(tiny_moe_path) / "config.json").read_text())
    if algorithm == "NEXTN":
        drafter = new_drafter(raw, "mtp")
    else:
        drafter = new_drafter(
            raw,
            "dflash",
            num_hidden_layers=2,
            block_size=4,
            target_layer_ids=[0, 2],
            mask_token_id=3,
        )
    # every sparse layer of the target config is sparse in the drafter too
    assert any(isinstance(m, SparseMoeBlock) for m in drafter.modules())
    save_drafter(drafter, tmp_path / "d")

    plain = LLM(tiny_moe_path, max_total_tokens=4096)
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, PARAMS)]
    llm = LLM(tiny_moe_path, max_total_tokens=4096)
    spec_drafter, planner = build_speculation(
        SpecConfig(algorithm, str(tmp_path / "d")), llm.engine
    )
    for module in vars(spec_drafter).values():
        if hasattr(module, "modules"):
            set_moe_backend(module, experts)
    llm.engine.set_speculation(spec_drafter, planner)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]
    assert got == want
    assert llm.engine.stats.num_draft_tokens > 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
