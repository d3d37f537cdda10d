"""`make demo`'s workloads: scaled from the seed, whole held-out files, never past the context."""

import json
import shutil
from pathlib import Path

from specserve.demo import BUNDLE, WORKLOADS, plan_workloads, write_heldout_prompts
from specserve.train.data import is_heldout


def _bundle(tmp_path: Path, context: int, long_rows: list[dict] | None) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "target").mkdir(parents=True)
    shutil.copy(BUNDLE / "target" / "tokenizer.json", bundle / "target")
    (bundle / "target" / "config.json").write_text(json.dumps({"max_position_embeddings": context}))
    if long_rows is not None:
        (bundle / "prompts_long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long_rows))
    return bundle


def test_workloads_are_the_seed_scaled():
    a, b = WORKLOADS
    assert (a.input_len, a.output_len, a.users) == (256, 512, 1)
    assert (b.input_len, b.output_len, b.users) == (2048, 256, 10)
    assert "seed: 64K/3K x10" in b.name


def test_a_long_enough_bundle_runs_both_workloads_from_its_files(tmp_path):
    rows = [{"domain": d, "token_ids": list(range(3000))} for d in ("code", "prose") * 6]
    bundle, out = _bundle(tmp_path, 4096, rows), tmp_path / "out"
    out.mkdir()
    entries, notes = plan_workloads(bundle, out)
    assert notes == []
    assert [e["max_concurrency"] for e in entries] == [1, 10]
    for entry, w in zip(entries, WORKLOADS, strict=True):
        lines = [json.loads(x) for x in Path(entry["dataset_path"]).read_text().splitlines()]
        assert len(lines) == entry["num_prompts"] == w.prompts
        assert all(x["prompt"] == list(range(w.input_len)) for x in lines)
        assert all(x["output_len"] == w.output_len for x in lines)


def test_a_short_context_falls_back_with_the_reason(tmp_path):
    rows = [{"domain": "code", "token_ids": list(range(2100))}] * 10
    bundle, out = _bundle(tmp_path, 2048, rows), tmp_path / "out"
    out.mkdir()
    entries, notes = plan_workloads(bundle, out)
    assert len(notes) == 1 and "context of 2048 tokens" in notes[0]
    assert entries[1]["name"].startswith("B: 1792 in / 256 out, 10 users")
    lines = Path(entries[1]["dataset_path"]).read_text().splitlines()
    assert all(len(json.loads(x)["prompt"]) == 1792 for x in lines)


def test_prompts_cut_from_this_machines_heldout_files(tmp_path):
    from specserve.bench.datasets import Tokenizer

    path = tmp_path / "long.jsonl"
    n = write_heldout_prompts(BUNDLE / "target", path, 512, 2)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert n == len(rows) > 0
    tok = Tokenizer(BUNDLE / "target")
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for r in rows:
        assert is_heldout(r["source"]) and len(r["token_ids"]) == 512
        if r["domain"] == "code":  # the prompt is the start of one whole held-out file
            assert tok.encode((stdlib / r["source"]).read_text())[:512] == r["token_ids"]


def test_the_compare_config_says_how_each_workload_was_scaled(tmp_path):
    from specserve.demo import compare_config

    rows = [{"domain": "code", "token_ids": list(range(2100))}] * 10
    bundle, out = _bundle(tmp_path, 2048, rows), tmp_path / "out"
    out.mkdir()
    (bundle / "mtp").mkdir(), (bundle / "dspark").mkdir()
    entries, notes = plan_workloads(bundle, out)
    cfg = compare_config(bundle, entries, notes)
    assert (
        "A 1K/1K x1 -> 256/512 x1" in cfg["notes"]
        and "B 64K/3K x10 -> 2048/256 x10" in cfg["notes"]
    )
    assert "1792-token prompts" in cfg["notes"]
    assert [a["name"] for a in cfg["arms"]] == ["NONE", "NEXTN (MTP)", "DSPARK"]
    assert cfg["baseline"] == "NEXTN (MTP)"
