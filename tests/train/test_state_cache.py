"""The disk target-state cache: exact round trip, shards from several ranks, refusals by field,
and training from it equals training from live target forwards."""

from __future__ import annotations

import json

import pytest
import torch

from specserve.cli import main
from specserve.models.loader import load_model
from specserve.train.drafter import target_states
from specserve.train.gendata import load_dataset
from specserve.train.parallel import World
from specserve.train.runlog import read_jsonl
from specserve.train.state_cache import CacheKey, TargetStateCache, write_cache

LAYERS = (0, 2)


@pytest.fixture(scope="module")
def live(tiny_target, tiny_data):
    target, cfg = load_model(tiny_target)
    ids = load_dataset(tiny_data)["input_ids"].long()
    key = CacheKey.of(tiny_target, ids, LAYERS, cfg.hidden_size)
    return target, ids, key, target_states(target, ids, LAYERS)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_round_trips_exactly(live, tmp_path, dtype):
    target, ids, key, (feats, last) = live
    cache = TargetStateCache(write_cache(target, key, ids, tmp_path / "c", dtype=dtype, chunk=5))
    idx = torch.tensor([7, 0, 15, 3, 3])
    got_feats, got_last = cache.batch(idx, "cpu")
    want = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    assert torch.equal(got_feats, feats[idx].to(want).float())
    assert torch.equal(got_last, last[idx].to(want).float())
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["dtype"] == dtype and cache.read(idx).dtype == want
    with pytest.raises(FileExistsError, match="already"):
        write_cache(target, key, ids, tmp_path / "c")


def test_shards_of_several_ranks_read_as_one(live, tmp_path):
    target, ids, key, (feats, last) = live
    for rank in (2, 1, 0):  # rank 0 writes the index, after every shard is there
        write_cache(target, key, ids, tmp_path / "c", World(rank, 3), "float32", chunk=4)
    shards = sorted(p.name for p in (tmp_path / "c").glob("shard-*.bin"))
    assert shards == [f"shard-0000{r}-of-00003.bin" for r in range(3)]
    got_feats, got_last = TargetStateCache(tmp_path / "c").batch(torch.arange(len(ids)), "cpu")
    assert torch.equal(got_feats, feats) and torch.equal(got_last, last)


def test_a_cache_of_another_target_data_or_layers_is_refused(live, tiny_target, tmp_path):
    from specserve.testing.tiny import make_checkpoint

    target, ids, key, _ = live
    cache = TargetStateCache(write_cache(target, key, ids, tmp_path / "c"))
    cache.check(key)
    other_ids = ids.clone()
    other_ids[3, 20] += 1
    other = make_checkpoint(tmp_path / "other", seed=4, init_std=0.08, num_hidden_layers=4)
    cases = {
        "data": CacheKey.of(tiny_target, other_ids, LAYERS, key.hidden_size),
        "target_layer_ids": CacheKey.of(tiny_target, ids, (1, 2), key.hidden_size),
        "target_weights": CacheKey.of(other, ids, LAYERS, key.hidden_size),
        "num_seqs": CacheKey.of(tiny_target, ids[:8], LAYERS, key.hidden_size),
    }
    for field, wrong in cases.items():
        with pytest.raises(ValueError, match=f"{field} is "):
            cache.check(wrong)
    cache.check(cases["target_layer_ids"], ignore=("target_layer_ids",))
    (tmp_path / "c" / "shard-00000-of-00001.bin").write_bytes(b"short")
    with pytest.raises(ValueError, match="rebuild"):
        TargetStateCache(tmp_path / "c")


def test_training_from_the_cache_equals_live_forwards(tiny_target, tiny_data, tmp_path, capsys):
    run = ["train", "drafter", "--algorithm", "dspark", "--target", tiny_target]
    run += ["--data", tiny_data, "--block-size", "4", "--anchors-per-seq", "4"]
    run += ["--target-layer-ids", *map(str, LAYERS), "--markov-rank", "16", "--steps", "3"]
    run += ["--global-batch-size", "4", "--threads", "1"]
    cache = tmp_path / "cache"
    write = ["train", "cache-target", "--target", tiny_target, "--data", tiny_data]
    write += ["--target-layer-ids", *map(str, LAYERS)]
    assert main([*write, "--out", str(cache), "--cache-dtype", "float32", "--batch-size", "6"]) == 0
    assert json.loads(capsys.readouterr().out)["target_layer_ids"] == list(LAYERS)
    assert main([*run, "--out", str(tmp_path / "live")]) == 0
    assert main([*run, "--out", str(tmp_path / "cached"), "--target-cache", str(cache)]) == 0
    live = read_jsonl(tmp_path / "live" / "train_log.jsonl")
    cached = read_jsonl(tmp_path / "cached" / "train_log.jsonl")
    assert len(live) == len(cached) == 3
    for a, b in zip(live, cached, strict=True):
        assert abs(a["total"] - b["total"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    wrong = [*run, "--target-layer-ids", "1", "2", "--steps", "1"]
    code = main([*wrong, "--out", str(tmp_path / "x"), "--target-cache", str(cache)])
    assert code == 2 and "target_layer_ids is [0, 2] in the cache" in capsys.readouterr().err


def test_padded_rows_run_only_to_their_chunks_longest_row(live, tmp_path):
    """Rows of pooled prompt lengths: the target runs each chunk up to its longest row; the
    states there equal a full forward (causal attention), zeros after."""
    target, ids, key, (feats, last) = live
    lengths = torch.tensor([10] * 8 + [ids.shape[1]] * (len(ids) - 8))
    cache = TargetStateCache(
        write_cache(target, key, ids, tmp_path / "c", dtype="float32", chunk=4, lengths=lengths)
    )
    got_feats, got_last = cache.batch(torch.arange(len(ids)), "cpu")
    assert torch.allclose(got_feats[:8, :10], feats[:8, :10], atol=1e-5)
    assert torch.allclose(got_last[:8, :10], last[:8, :10], atol=1e-5)
    assert got_feats[:8, 10:].eq(0).all() and got_last[:8, 10:].eq(0).all()
    assert torch.equal(got_feats[8:], feats[8:]) and torch.equal(got_last[8:], last[8:])
