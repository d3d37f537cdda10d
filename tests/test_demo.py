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


def test_rounds_summary_takes_min_median_and_each_rounds_own_ratio():
    from specserve.demo import rounds_summary

    arms = ["NONE", "NEXTN (MTP)", "DSPARK"]
    wl = [{"name": "B"}]
    tok = {"NONE": [100.0, 200.0], "NEXTN (MTP)": [150.0, 150.0], "DSPARK": [300.0, 300.0]}
    results = [
        {
            "arm": a,
            "round": n + 1,
            "workload": "B",
            "completed": 10,
            "output_throughput": t,
            "accept_length": 1.0 if a == "NONE" else 3.0,
        }
        for a, ts in tok.items()
        for n, t in enumerate(ts)
    ]
    results.append({"arm": "DSPARK", "round": 3, "workload": "B", "completed": 0})  # failed
    text = rounds_summary(arms, wl, results)
    assert "| NONE | 100.0 / 150.0 | 1.00 |" in text
    assert "| DSPARK | 300.0 / 300.0 | 3.00 |" in text
    # per round 3.0x and 1.5x against NONE: not 300 / 150 = 2.0x of the medians
    assert "DSPARK vs NONE: 1.50x / 2.25x" in text
    assert "DSPARK vs NEXTN (MTP): 2.00x / 2.00x" in text
    assert "Greedy outputs" not in text  # no texts kept: nothing claimed

    for r in results:
        r |= {"temperature": 0.0, "generated_texts": ["x", "y"]}
    wl = [{"name": "B", "temperature": 0.0}]
    text = rounds_summary(arms, wl, results)  # round 3 had no complete pair: not compared
    assert "Greedy outputs identical to NONE's in every round compared (2 of 3)." in text
    results[-2]["generated_texts"] = ["x", "z"]  # DSPARK, round 2
    assert "Greedy outputs DIFFER from NONE's in rounds [2]." in rounds_summary(arms, wl, results)
