"""Flags, drafter checkpoints and their validation against the target."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from specserve.config import ConfigError, SpecConfig
from specserve.core import SamplingParams
from specserve.speculative.block_drafter import DFlashDrafter
from specserve.speculative.checkpoint import load_drafter, new_drafter, read_config, save_drafter
from specserve.speculative.dspark import DSparkDraftModel
from specserve.speculative.factory import add_cli_args, build_speculation, spec_config_from_args
from specserve.speculative.gate import DraftGate
from specserve.speculative.mtp import MTPDrafter
from specserve.speculative.ngram import NgramDrafter, lookup
from specserve.speculative.planner import PrefixScheduler
from specserve.speculative.profile import SPSTable

from .conftest import make_llm


def _parse(*argv):
    p = argparse.ArgumentParser()
    add_cli_args(p)
    return spec_config_from_args(p.parse_args(list(argv)))


def test_flags_to_config():
    s = _parse(
        "--speculative-algorithm",
        "mtp",
        "--speculative-draft-model-path",
        "/x",
        "--speculative-num-steps",
        "3",
        "--speculative-num-draft-tokens",
        "4",
    )
    assert (s.algorithm, s.num_steps, s.num_draft_tokens, s.policy) == ("NEXTN", 3, 4, "full")
    s = _parse("--speculative-algorithm", "DSPARK", "--speculative-draft-model-path", "/x")
    assert s.policy == "scheduler" and s.confidence_threshold == 0.5
    assert s.adaptive_drafting  # the draft gate is on by default
    off = _parse("--speculative-algorithm", "NGRAM", "--no-speculative-adaptive-drafting")
    assert not off.adaptive_drafting
    assert _parse().algorithm == "NONE"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"algorithm": "EAGLE9"}, "--speculative-algorithm"),
        ({"algorithm": "DSPARK"}, "--speculative-draft-model-path"),
        ({"algorithm": "NGRAM", "eagle_topk": 4}, "--speculative-eagle-topk 4"),
        (
            {"algorithm": "NEXTN", "draft_model_path": "x", "num_steps": 3, "num_draft_tokens": 8},
            "--speculative-num-steps + 1",
        ),
        ({"algorithm": "NGRAM", "verify_policy": "greedy"}, "--speculative-verify-policy"),
        ({"algorithm": "NGRAM", "confidence_threshold": 1.5}, "confidence-threshold"),
        ({"algorithm": "NGRAM", "num_draft_tokens": 1}, "--speculative-num-draft-tokens"),
    ],
)
def test_bad_flags_are_refused_by_name(flags, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        SpecConfig(**flags)


def test_bad_build_requests(bundle, tmp_path):
    llm = make_llm(bundle)
    cases = [
        (SpecConfig("DSPARK", str(tmp_path / "nope")), "no such folder"),
        (SpecConfig("NEXTN", str(bundle["dspark"])), "not an MTP drafter"),
        (SpecConfig("DFLASH", str(bundle["mtp"])), "is an MTP drafter"),
        (SpecConfig("DSPARK", str(bundle["dspark"]), block_size=9), "trained block_size 4"),
        (SpecConfig("NGRAM", confidence_sts_path="x.json"), "needs --speculative-algorithm"),
    ]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_speculation(spec, llm.engine)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("vocab_size", 1024, "vocab_size is 1024"),
        ("hidden_size", 32, "hidden_size is 32"),
        ("target_layer_ids", [0, 5], "target_layer_ids"),
        ("num_target_layers", 7, "num_target_layers is 7"),
    ],
)
def test_mismatched_drafter_is_refused(bundle, tmp_path, field, value, message):
    bad = tmp_path / "bad"
    shutil.copytree(bundle["dspark"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg[field] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    llm = make_llm(bundle)
    with pytest.raises(ConfigError, match=message):
        build_speculation(SpecConfig("DSPARK", str(bad)), llm.engine)


def test_dspark_folder_round_trips_in_deepspec_layout(bundle, tmp_path):
    llm = make_llm(bundle)
    target = llm.engine.model
    raw = target.config.raw
    model = new_drafter(
        raw,
        "dspark",
        2,
        seed=3,
        block_size=5,
        target_layer_ids=[-1, 0, 1],
        mask_token_id=4,
        markov_rank=16,
        markov_head_type="gated",
        enable_confidence_head=True,
        confidence_head_with_markov=True,
    )
    save_drafter(model, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["tie_word_embeddings"] is False
    assert (cfg["num_hidden_layers"], cfg["num_target_layers"], cfg["block_size"]) == (2, 2, 5)
    assert cfg["target_layer_ids"] == [-1, 0, 1] and cfg["markov_head_type"] == "gated"
    names = set(load_file(str(tmp_path / "d" / "model.safetensors")))
    for name in (
        "layers.1.self_attn.q_norm.weight",
        "layers.0.mlp.down_proj.weight",
        "fc.weight",
        "hidden_norm.weight",
        "norm.weight",
        "markov_head.markov_w1.weight",
        "markov_head.markov_w2.weight",
        "markov_head.gate_proj.weight",
        "confidence_head.proj.weight",
        "confidence_head.proj.bias",
    ):
        assert name in names
    assert not any(n.startswith(("embed_tokens", "lm_head")) for n in names)  # shared
    loaded = load_drafter(tmp_path / "d", llm.engine.target_handle())
    assert isinstance(loaded, DSparkDraftModel) and loaded.config == model.config
    assert loaded.lm_head is target.lm_head
    mine = {k: v for k, v in model.state_dict().items() if not k.startswith(("embed", "lm_head"))}
    for k, v in mine.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_deepseek_v4_style_prefixed_config(bundle, tmp_path):
    llm = make_llm(bundle)
    src = bundle["dspark"]
    cfg = json.loads((src / "config.json").read_text())
    v4 = {k: v for k, v in llm.engine.model.config.raw.items()}
    v4.update(
        dspark_block_size=cfg["block_size"],
        dspark_target_layer_ids=cfg["target_layer_ids"],
        dspark_noise_token_id=cfg["mask_token_id"],
        dspark_markov_rank=cfg["markov_rank"],
        dspark_markov_head_type="vanilla",
        dspark_enable_confidence_head=True,
        dspark_confidence_head_with_markov=True,
        dspark_num_layers=1,
    )
    out = tmp_path / "v4"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(v4))
    state = load_file(str(src / "model.safetensors"))
    save_file({f"dspark.{k}": v for k, v in state.items()}, str(out / "model.safetensors"))
    raw = read_config(out)
    assert raw["mask_token_id"] == cfg["mask_token_id"] and raw["num_target_layers"] == 2
    drafter, _ = build_speculation(SpecConfig("DSPARK", str(out), verify_policy="full"), llm.engine)
    ref, _ = build_speculation(SpecConfig("DSPARK", str(src), verify_policy="full"), llm.engine)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(drafter.model.state_dict()[k], v), k


def test_factory_builds_each_drafter_and_profiles_sps(bundle, tmp_path):
    llm = make_llm(bundle)
    eng = llm.engine
    d, _ = build_speculation(SpecConfig("NGRAM", num_draft_tokens=6), eng)
    assert isinstance(d, NgramDrafter) and d.max_draft_tokens == 5
    d, _ = build_speculation(SpecConfig("MTP", str(bundle["mtp"]), num_steps=2), eng)
    assert isinstance(d, MTPDrafter) and d.max_draft_tokens == 2
    sps = tmp_path / "sps.json"
    d, planner = build_speculation(
        SpecConfig("DSPARK", str(bundle["dspark"]), block_size=3, sps_table_path=str(sps)), eng
    )
    assert isinstance(d, DFlashDrafter) and isinstance(d.model, DSparkDraftModel)
    assert isinstance(planner, DraftGate) and d.max_draft_tokens == 3  # the default gate
    assert isinstance(planner.planner, PrefixScheduler)
    table = SPSTable.load(sps)  # profiled on this machine at start-up, then saved
    assert table.batch_tokens[0] == 1 and len(table.batch_tokens) >= 3
    eng.set_speculation(d, planner)
    out = llm.generate([5, 6, 7, 8], SamplingParams(max_tokens=8, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 8


def test_ngram_lookup():
    assert lookup([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]  # 3-gram match
    assert lookup([5, 2, 3, 8, 4, 2, 3], 3) == [8, 4, 2]  # 2-gram when no 3-gram
    assert lookup([1, 2, 7, 1, 2, 8, 0, 2], 1) == [8]  # most recent 1-gram occurrence
    assert lookup([1, 2, 3], 4) == []
    assert lookup([4, 4, 4], 3) == [4]  # overlapping: the tokens that followed


def test_hidden_state_drafters_keep_prefix_caching(bundle):
    """A prefix-cache hit skips the target forward over the cached tokens; the drafter gets their
    hidden states from the pool kept beside the K/V (tests/speculative/test_prefix_hidden.py),
    so prefix caching stays on with every drafter."""
    llm = make_llm(bundle, "DFLASH", "full")
    assert llm.engine.block_manager.enable_prefix_caching
    prompt = list(range(10, 60))
    first = llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0))[0]
    out = llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.meta_info[0]["cached_tokens"] == 48
    assert out.outputs[0].token_ids == first.outputs[0].token_ids
    assert make_llm(bundle, "NGRAM", "full").engine.block_manager.enable_prefix_caching
