"""The demo-bundle build: the long-context recipe, its measurements, and every stage at a tiny
scale (`python -m specserve.train.bundle --smoke`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from specserve.train.bundle import FULL, SMOKE, Recipe


def test_full_recipe_is_long_context_and_skips_the_last_layer():
    assert FULL.target_train["seq_len"] == 2048
    assert FULL.model["max_position_embeddings"] >= 4096
    assert min(FULL.prompt_lens) == 64 and max(FULL.prompt_lens) == 2048
    assert FULL.eval_lens == (64, 512, 2048)
    last = FULL.model["num_hidden_layers"] - 1
    assert last not in FULL.target_layer_ids and len(FULL.target_layer_ids) == 3
    assert last - 1 in FULL.target_layer_ids  # still reads the top of the stack below the norm
    with pytest.raises(ValueError, match="exceed the context"):
        Recipe(**{**_fields(SMOKE), "eval_lens": (16, 32, 4096)})


def _fields(recipe: Recipe) -> dict:
    from dataclasses import fields

    return {f.name: getattr(recipe, f.name) for f in fields(recipe) if f.init}


def test_position_loss_buckets_average_to_the_lm_loss(tiny_target, tmp_path):
    from specserve.models.loader import load_model
    from specserve.train.bundle_eval import heldout_position_loss
    from specserve.train.target import lm_loss

    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 500, (2, 40), generator=gen)
    path = tmp_path / "long.jsonl"
    path.write_text(
        "".join(json.dumps({"domain": "code", "token_ids": r.tolist()}) + "\n" for r in rows)
    )
    got = heldout_position_loss(tiny_target, path, (0, 8, 20, 40))["code"]
    model, _ = load_model(tiny_target)
    with torch.no_grad():
        whole = lm_loss(model, rows).item()
    counts = {"0-8": 7, "8-20": 12, "20-40": 20}  # predicted positions 1..39
    mean = sum(got[k] * n for k, n in counts.items()) / 39
    assert mean == pytest.approx(whole, abs=1e-3)
    with torch.no_grad():
        early = lm_loss(model, rows[:, :8]).item()  # predictions of positions 1..7
    assert got["0-8"] == pytest.approx(early, abs=1e-3)


def test_stage_estimates_from_step_times():
    from specserve.train.bundle_eval import stage_estimates

    rates = {
        "rates": {n: (1.0, 0.01) for n in ("target_row", "gen_row", "forward_row", "eval_row")}
    }
    rates["rates"] |= {f"{a}_row": (0.5, 0.0) for a in ("mtp", "dflash", "dspark")}
    est = stage_estimates(SMOKE, rates, jobs=2)
    assert est["target"] == pytest.approx(2 * 2 * (1 + 0.01 * 129), abs=0.05)
    # 3 and 2 prompts per domain of 16 and 64 tokens, +8 new, sampled and greedy: 12 x 24, 8 x 72
    assert est["cache-target"] == pytest.approx(12 * 1.24 + 8 * 1.72, abs=0.05)
    assert est["drafters"] == pytest.approx(max(2 * 2 * 0.5, 3 * 2 * 2 * 0.5 / 2), abs=0.05)


@pytest.mark.slow
def test_smoke_build_runs_every_stage_and_resumes(tmp_path):
    from transformers import AutoModelForCausalLM

    from specserve.train.bundle import main

    assert main(["--smoke", "--work", str(tmp_path)]) == 0
    out, work = tmp_path / "bundle", tmp_path / "work"
    hf = AutoModelForCausalLM.from_pretrained(out / "target")
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    assert hf.config.max_position_embeddings == SMOKE.model["max_position_embeddings"]
    for alg in ("mtp", "dflash", "dspark"):  # float16 on disk, as the target
        cfg = json.loads((out / alg / "config.json").read_text())
        assert cfg["torch_dtype"] == "float16"
        with safe_open(out / alg / "model.safetensors", "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    for alg in ("dflash", "dspark"):
        cfg = json.loads((out / alg / "config.json").read_text())
        assert cfg["target_layer_ids"] == list(SMOKE.target_layer_ids)
        assert SMOKE.model["num_hidden_layers"] - 1 not in cfg["target_layer_ids"]
    results = json.loads((out / "eval.json").read_text())
    for ctx in SMOKE.eval_lens:
        for temp in ("t0", "t1"):
            for run in ("mtp-1", "mtp-3", "dflash-7", "dspark-7"):
                r = results[f"{run}@{temp}@{ctx}"]
                assert r["domains"]["all"]["rounds"] > 0 and r["block_size"] > 0
    train = [json.loads(x) for x in (work / "prompts_train_64.jsonl").read_text().splitlines()]
    assert {len(x["token_ids"]) for x in train} == {64}
    long = [json.loads(x) for x in (out / "prompts_long.jsonl").read_text().splitlines()]
    assert long and all(len(x["token_ids"]) == max(SMOKE.eval_lens) for x in long)
    assert len({x["source"] for x in long}) == len(long)  # one whole file per prompt
    readme = (out / "README.md").read_text()
    assert "by the position of" in readme and "context 64" in readme
    first = json.loads((work / "stage_seconds.json").read_text())
    # a stale evaluation time that the README must not show after the next run
    (work / "stage_seconds.json").write_text(json.dumps(first | {"evaluate": 9999}))
    assert main(["--smoke", "--work", str(tmp_path)]) == 0  # resumes: every stage is done
    again = json.loads((work / "stage_seconds.json").read_text())
    assert {k for k in first if first[k] != again[k]} <= {"evaluate"}
    readme = (out / "README.md").read_text()
    assert f"| evaluate | {again['evaluate']:.0f} |" in readme and "9999" not in readme
    # a checkout of the bundle without its work folder: re-evaluated, nothing trained again
    models = {p: p.read_bytes() for p in out.glob("*/model.safetensors")}
    shutil.rmtree(work)
    assert main(["--smoke", "--work", str(tmp_path)]) == 0
    redone = json.loads((work / "stage_seconds.json").read_text())
    assert "gen-data-heldout" in redone and "evaluate" in redone
    assert not {
        "tokenizer",
        "target-short",
        "target",
        "export",
        "gen-data",
        "cache-target",
        "drafters",
    } & set(redone)
    assert {p: p.read_bytes() for p in out.glob("*/model.safetensors")} == models
    assert "inputs" in json.loads((out / "eval.json").read_text())  # what it measured


def test_evaluation_is_redone_when_what_it_read_changes(tmp_path):
    from specserve.train.bundle_eval import _fingerprint

    model, data = tmp_path / "dspark", tmp_path / "data"
    model.mkdir(), data.mkdir()
    (model / "model.safetensors").write_bytes(b"float32 weights")
    (model / "train_log.json").write_text("{}")
    (data / "data.pt").write_bytes(b"continuations")
    first = _fingerprint([model, data])
    (model / "train_log.json").write_text('{"steps": 1}')  # not read by the evaluation
    (data / "eval_t0_s0.pt").write_bytes(b"a cache the evaluation writes")
    assert _fingerprint([model, data]) == first
    (model / "model.safetensors").write_bytes(b"float16 weights")
    assert _fingerprint([model, data]) != first
    (model / "model.safetensors").write_bytes(b"float32 weights")
    (data / "data.pt").write_bytes(b"other continuations")
    assert _fingerprint([model, data]) != first
