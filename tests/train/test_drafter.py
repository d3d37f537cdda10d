"""Drafter training: losses go down, no draft slot sees the future, folders load, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specserve.models.loader import load_model
from specserve.speculative.checkpoint import load_drafter, save_drafter
from specserve.speculative.handle import TargetHandle
from specserve.train.anchors import sample_anchors
from specserve.train.drafter import (
    DrafterSpec,
    build_drafter,
    step_loss,
    target_states,
    train_drafter,
    trainable,
)
from specserve.train.gendata import load_dataset
from specserve.train.loop import TrainConfig, make_optimizer

from .conftest import PROMPT_LEN

SPECS = {
    "mtp": DrafterSpec("mtp", mtp_depth=2),
    "dflash": DrafterSpec("dflash", block_size=4, anchors_per_seq=4, target_layer_ids=(0, 2)),
    "dspark": DrafterSpec(
        "dspark", block_size=4, anchors_per_seq=4, target_layer_ids=(0, 2), markov_rank=16
    ),
}


def _setup(tiny_target, algorithm):
    target, cfg = load_model(tiny_target)
    torch.manual_seed(0)
    drafter = build_drafter(SPECS[algorithm], target, cfg.raw)
    return target, drafter


@pytest.mark.parametrize("algorithm", ["mtp", "dflash", "dspark"])
def test_one_step_lowers_the_loss(tiny_target, tiny_data, algorithm):
    target, drafter = _setup(tiny_target, algorithm)
    batch = load_dataset(tiny_data)["input_ids"][:8].long()
    spec = SPECS[algorithm]

    def loss():
        gen = torch.Generator().manual_seed(1)
        return step_loss(drafter, target, batch, PROMPT_LEN, spec, gen)

    opt = make_optimizer(drafter.parameters(), TrainConfig(lr=3e-3, weight_decay=0.0))
    before = loss()
    before.total.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after.total.item() < before.total.item()
    assert not any(p.requires_grad for p in target.parameters())
    assert drafter.lm_head is target.lm_head  # shared and frozen


def test_anchors_stay_in_the_generated_part():
    gen = torch.Generator().manual_seed(0)
    anchors, mask = sample_anchors(64, 40, 12, 8, gen)
    assert mask.all()
    assert (anchors >= 11).all() and (anchors <= 38).all()
    assert all(len(set(row.tolist())) == 8 for row in anchors)
    few, fmask = sample_anchors(2, 14, 12, 8, gen)  # only anchors 11 and 12 exist
    assert fmask.sum(1).tolist() == [2, 2] and sorted(few[0, :2].tolist()) == [11, 12]


@pytest.mark.parametrize("algorithm", ["dflash", "dspark"])
def test_a_block_never_sees_the_future(tiny_target, tiny_data, algorithm):
    """Block at anchor a: slot k's outputs depend only on tokens <= a + k (slot k's input is
    the true token at a + k under teacher forcing) and on target features < a."""
    target, drafter = _setup(tiny_target, algorithm)
    ids = load_dataset(tiny_data)["input_ids"][:1].long()
    t = ids.shape[1]
    anchors = torch.tensor([[14, 20]])
    feats, _ = target_states(target, ids, drafter.config.target_layer_ids)
    base = drafter(ids, feats, anchors)
    for k in range(drafter.block_size):
        cut = 14 + k + 1  # slot k predicts the token here: change it and everything after
        ids2 = ids.clone()
        ids2[0, cut:] = (ids2[0, cut:] + 7) % 500 + 3
        feats2 = feats.clone()
        feats2[0, 14:] = torch.randn_like(feats2[0, 14:])  # the anchor's own features too
        out = drafter(ids2, feats2, anchors)
        assert torch.allclose(out.logits[0, 0, : k + 1], base.logits[0, 0, : k + 1], atol=1e-5)
        if algorithm == "dspark":
            c, c0 = out.confidence_logits[0, 0, : k + 1], base.confidence_logits[0, 0, : k + 1]
            assert torch.allclose(c, c0, atol=1e-5)
        assert t > cut


def test_mtp_rows_never_see_the_future(tiny_target, tiny_data):
    target, mtp = _setup(tiny_target, "mtp")
    ids = load_dataset(tiny_data)["input_ids"][:1].long()
    _, last = target_states(target, ids, (3,))
    base = mtp(ids, last)
    ids2, last2 = ids.clone(), last.clone()
    ids2[0, 18:] = (ids2[0, 18:] + 5) % 500 + 3
    last2[0, 17:] = torch.randn_like(last2[0, 17:])
    out = mtp(ids2, last2)  # row i reads h_i and t_{i+1}: rows <= 16 are unaffected
    assert torch.allclose(out.logits[0, :17], base.logits[0, :17], atol=1e-5)


@pytest.mark.parametrize("algorithm", ["mtp", "dflash", "dspark"])
def test_saved_drafter_loads_and_saves_back(tiny_target, tiny_data, tmp_path, algorithm):
    spec = SPECS[algorithm]
    cfg = TrainConfig(steps=2, batch_size=4, warmup=1)
    train_drafter(spec, tiny_target, tiny_data, tmp_path / "a", cfg)
    target, _ = load_model(tiny_target)
    loaded = load_drafter(tmp_path / "a", TargetHandle.of(target))
    save_drafter(loaded, tmp_path / "b")
    again = load_drafter(tmp_path / "b", TargetHandle.of(target))
    a, b = trainable(loaded), trainable(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    raw = json.loads((tmp_path / "a" / "config.json").read_text())
    if algorithm != "mtp":
        assert raw["block_size"] == 4 and raw["target_layer_ids"] == [0, 2]
        assert raw["enable_confidence_head"] == (algorithm == "dspark")


def test_resume_continues_from_the_last_checkpoint(tiny_target, tiny_data, tmp_path, monkeypatch):
    from specserve.train import loop

    spec = SPECS["dspark"]
    cfg = TrainConfig(steps=4, batch_size=4, warmup=1, checkpoint_minutes=0.0)
    train_drafter(spec, tiny_target, tiny_data, tmp_path / "full", cfg)
    # Interrupt the same run during its third step (after two checkpoints), then resume.
    calls = []
    real_update = loop.Progress.update

    def update(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_update(self, *args, **kw)

    monkeypatch.setattr(loop.Progress, "update", update)
    with pytest.raises(KeyboardInterrupt):
        train_drafter(spec, tiny_target, tiny_data, tmp_path / "resumed", cfg)
    monkeypatch.setattr(loop.Progress, "update", real_update)
    ck = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 2 and not (tmp_path / "resumed" / "model.safetensors").exists()
    log = train_drafter(spec, tiny_target, tiny_data, tmp_path / "resumed", cfg, resume=True)
    assert log["log"][-1]["step"] == 3
    target, _ = load_model(tiny_target)
    a = trainable(load_drafter(tmp_path / "full", TargetHandle.of(target)))
    b = trainable(load_drafter(tmp_path / "resumed", TargetHandle.of(target)))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("algorithm", ["mtp", "dspark"])
def test_cached_target_states_train_the_same_drafter(tiny_target, tiny_data, tmp_path, algorithm):
    """`--cache-target-states` runs the frozen target once up front; the steps must see exactly
    the states a per-step forward gives, so both runs end with the same weights (a float32
    cache; the default bf16 one rounds the states)."""
    spec = SPECS[algorithm]
    cfg = TrainConfig(steps=3, batch_size=4, warmup=1)
    plain = train_drafter(spec, tiny_target, tiny_data, tmp_path / "plain", cfg)
    cached = train_drafter(
        spec,
        tiny_target,
        tiny_data,
        tmp_path / "cached",
        cfg,
        cache_states=True,
        cache_dtype="float32",
    )
    assert [r["total"] for r in cached["log"]] == pytest.approx(
        [r["total"] for r in plain["log"]], abs=1e-4
    )
    target, _ = load_model(tiny_target)
    a = trainable(load_drafter(tmp_path / "plain", TargetHandle.of(target)))
    b = trainable(load_drafter(tmp_path / "cached", TargetHandle.of(target)))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_several_data_folders_are_pooled(tiny_target, tiny_data, tmp_path):
    from specserve.train.gendata import generate_dataset

    greedy = tmp_path / "greedy"
    generate_dataset(
        tiny_target, _prompts_file(tiny_data), greedy, PROMPT_LEN, 16, 0.0, batch_size=16
    )
    one, two = load_dataset(tiny_data), load_dataset(greedy)
    both = load_dataset([tiny_data, greedy])
    assert torch.equal(both["input_ids"], torch.cat([one["input_ids"], two["input_ids"]]))
    assert both["domains"] == one["domains"] + two["domains"]
    short = tmp_path / "short"
    generate_dataset(tiny_target, _prompts_file(tiny_data), short, PROMPT_LEN, 8, 0.0)
    with pytest.raises(ValueError, match="differ in"):
        load_dataset([tiny_data, short])


def _prompts_file(data_dir: str):
    from specserve.train.gendata import dataset_meta

    return dataset_meta(data_dir)["prompts"]


def test_anchors_per_row_lengths():
    gen = torch.Generator().manual_seed(0)
    prompt, end = torch.tensor([5, 20, 12]), torch.tensor([30, 40, 14])
    anchors, mask = sample_anchors(3, end, prompt, 6, gen)
    for a, m, p, e in zip(anchors, mask, prompt, end, strict=True):
        got = a[m].tolist()
        assert got == sorted(got) and len(set(got)) == len(got)
        assert all(p - 1 <= x <= e - 2 for x in got)
    assert mask.sum(1).tolist() == [6, 6, 2]  # row 3 has only anchors 11 and 12


@pytest.mark.parametrize("algorithm", ["mtp", "dspark"])
def test_padded_rows_lose_as_their_unpadded_selves(tiny_target, tiny_data, tmp_path, algorithm):
    """Pooling folders of different prompt lengths pads rows on the right; a padded row's loss
    must not see its padding: it equals the loss of the row alone, cut to its length."""
    from specserve.train.gendata import generate_dataset

    short = tmp_path / "short"
    generate_dataset(tiny_target, _prompts_file(tiny_data), short, 6, 8, 0.0, batch_size=16)
    pooled = load_dataset([tiny_data, short], pad=True)
    with pytest.raises(ValueError, match="differ in"):
        load_dataset([tiny_data, short])
    n = len(load_dataset(tiny_data)["input_ids"])
    assert pooled["prompt_lens"][n:].eq(6).all() and pooled["lengths"][n:].eq(14).all()
    assert pooled["input_ids"][n:, 14:].eq(0).all()
    target, _ = load_model(tiny_target)
    spec = DrafterSpec(algorithm=algorithm, block_size=4, anchors_per_seq=32)
    cfg = json.loads((Path(tiny_target) / "config.json").read_text())
    drafter = build_drafter(spec, target, cfg).eval()
    row = pooled["input_ids"][n : n + 1].long()
    losses = []
    for ids, lengths in ((row, torch.tensor([14])), (row[:, :14], None)):
        gen = torch.Generator().manual_seed(1)
        parts = step_loss(drafter, target, ids, torch.tensor([6]), spec, gen, None, lengths)
        losses.append(parts.total.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_batches_group_rows_of_one_length_and_cover_an_epoch():
    from specserve.train.drafter import _batch_indices

    lengths = torch.tensor([10] * 12 + [40] * 8)
    batches = [_batch_indices(s, 4, lengths, seed=3) for s in range(5)]
    assert sorted(torch.cat(batches).tolist()) == list(range(20))  # each row once per epoch
    assert all(len(set(lengths[b].tolist())) == 1 for b in batches)
    assert [b.tolist() for b in batches] != [b.tolist() for b in sorted(batches, key=min)]
    assert not torch.equal(_batch_indices(5, 4, lengths, 3), batches[0])  # a new epoch reshuffles


def test_default_layer_ids_never_take_the_last_layer():
    """DFlash's spacing for Qwen3-8B, and never the target's last layer (llama.cpp's DSpark has
    no input behind it); the demo bundle's recipe gets [1, 4, 6] of 8 from the same rule."""
    from specserve.train.bundle import FULL
    from specserve.train.drafter import default_layer_ids

    assert default_layer_ids(36, 5) == (1, 9, 17, 25, 33)
    assert default_layer_ids(8) == (1, 4, 6)
    for n in range(2, 80):
        ids = default_layer_ids(n)
        assert max(ids) < n - 1 and list(ids) == sorted(set(ids))
    assert FULL.target_layer_ids == (1, 4, 6)
