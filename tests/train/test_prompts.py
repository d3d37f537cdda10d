"""Prompts cut from corpus files: windows, and whole-file long-context prompts."""

import json

from specserve.train.gendata import make_prompts
from specserve.train.tokenizer import load_tokenizer, train_tokenizer


def _corpus(root):
    code = root / "code"
    code.mkdir(parents=True)
    for i in range(40):
        lines = 4 if i % 3 == 0 else 60  # every third file is too short for a long prompt
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(lines))
        (code / f"m{i}.py").write_text(body)
    return code


def test_whole_file_prompts_are_file_starts_never_joined(tmp_path):
    code = _corpus(tmp_path)
    train_tokenizer([str(code)], 300, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    out = tmp_path / "long.jsonl"
    n = make_prompts([code], tmp_path / "tok", "train", 100, 200, out, whole_files=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == len(rows) > 10
    assert len({r["source"] for r in rows}) == n  # one prompt per file
    for r in rows:
        ids = tok.encode((code / r["source"]).read_text()).ids
        assert len(ids) >= 200 and r["token_ids"] == ids[:200] and r["domain"] == "code"
    assert all(int(r["source"][1:-3]) % 3 for r in rows)  # the short files were skipped


def test_window_prompts_come_from_one_file(tmp_path):
    code = _corpus(tmp_path)
    train_tokenizer([str(code)], 300, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    out = tmp_path / "p.jsonl"
    make_prompts([code], tmp_path / "tok", "train", 20, 64, out, seed=1)
    for line in out.read_text().splitlines():
        r = json.loads(line)
        ids = tok.encode((code / r["source"]).read_text()).ids
        starts = [i for i in range(len(ids) - 63) if ids[i : i + 64] == r["token_ids"]]
        assert starts, "a window is a contiguous piece of its source file"
