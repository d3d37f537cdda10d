import json
import random

import pytest

from specserve.bench import datasets
from specserve.bench.datasets import DatasetError, Tokenizer


def test_random_prompts_have_exact_length_in_tokenizer(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    rows = datasets.sample_random(tok, 30, 64, 8, 0.5, random.Random(0))
    assert len(rows) == 30
    for row in rows:
        assert isinstance(row.prompt, str)
        assert 32 <= row.prompt_len <= 64 and 4 <= row.output_len <= 8
        assert len(tok.encode(row.prompt)) == row.prompt_len
    assert len({r.prompt_len for r in rows}) > 1  # range ratio 0.5 varies the lengths


def test_random_exact_lengths_and_seed(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    a = datasets.sample_random(tok, 3, 200, 16, 1.0, random.Random(7))
    b = datasets.sample_random(tok, 3, 200, 16, 1.0, random.Random(7))
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert all(len(tok.encode(r.prompt)) == 200 and r.output_len == 16 for r in a)


def test_random_ids():
    rows = datasets.sample_random_ids(5, 10, 4, 1.0, 50, random.Random(1))
    assert all(len(r.prompt) == 10 == r.prompt_len and r.output_len == 4 for r in rows)
    assert all(0 <= i < 50 for r in rows for i in r.prompt)


def test_bad_lengths_rejected():
    with pytest.raises(DatasetError, match="range-ratio"):
        datasets.sample_random_ids(1, 10, 4, 1.5, 50, random.Random(1))
    with pytest.raises(DatasetError, match="at least 1"):
        datasets.sample_random_ids(1, 0, 4, 1.0, 50, random.Random(1))


def test_jsonl(tmp_path, tokenizer_dir):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"prompt": "the quick brown fox", "output_len": 7})
        + "\n\n"
        + json.dumps({"prompt": [1, 2, 3]})
        + "\n"
    )
    tok = Tokenizer(tokenizer_dir)
    rows = datasets.load_jsonl(path, 2, 11, tok)
    assert rows[0].output_len == 7 and rows[0].prompt_len == len(tok.encode("the quick brown fox"))
    assert rows[1].prompt == [1, 2, 3] and rows[1].prompt_len == 3 and rows[1].output_len == 11
    with pytest.raises(DatasetError, match="2 usable prompts"):
        datasets.load_jsonl(path, 5, 11, tok)
    path.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(DatasetError, match=r"p.jsonl:1"):
        datasets.load_jsonl(path, 1, 11, None)


def test_sharegpt(tmp_path, tokenizer_dir):
    conv = [
        {
            "conversations": [
                {"from": "human", "value": "the quick brown fox jumps over"},
                {"from": "gpt", "value": "the lazy speculative decoder jumps"},
            ]
        },
        {"conversations": [{"from": "human", "value": "hi"}]},  # one turn: skipped
        {
            "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]
        },  # short
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(conv))
    tok = Tokenizer(tokenizer_dir)
    rows = datasets.load_sharegpt(path, 1, tok, None, random.Random(0))
    assert rows[0].prompt == "the quick brown fox jumps over"
    assert rows[0].output_len == len(tok.encode("the lazy speculative decoder jumps"))
    fixed = datasets.load_sharegpt(path, 1, None, 32, random.Random(0))
    assert fixed[0].output_len == 32
    with pytest.raises(DatasetError, match="--tokenizer"):
        datasets.load_sharegpt(path, 1, None, None, random.Random(0))


def test_missing_files(tmp_path):
    with pytest.raises(DatasetError, match="no tokenizer.json"):
        Tokenizer(tmp_path)
    with pytest.raises(DatasetError, match="cannot read"):
        datasets.load_jsonl(tmp_path / "nope.jsonl", 1, 1, None)


def test_domains_in_turn(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [("code", [1]), ("code", [2]), ("code", [3]), ("prose", [10]), ("prose", [20])]
    path.write_text("".join(json.dumps({"domain": d, "token_ids": t}) + "\n" for d, t in rows))
    assert datasets.domains_in_turn(path) == [[1], [10], [2], [20], [3]]
    path.write_text('{"domain": "code"}\n')
    with pytest.raises(DatasetError, match=r"prompts.jsonl:1: expected"):
        datasets.domains_in_turn(path)


def test_domains_in_turn_cuts_long_prompts_and_drops_short_ones(tmp_path):
    path = tmp_path / "long.jsonl"
    rows = [("code", [1, 2, 3, 4]), ("code", [5, 6]), ("prose", [7, 8, 9]), ("code", [9] * 5)]
    path.write_text("".join(json.dumps({"domain": d, "token_ids": t}) + "\n" for d, t in rows))
    assert datasets.domains_in_turn(path, length=3) == [[1, 2, 3], [7, 8, 9], [9, 9, 9]]
    assert datasets.domains_in_turn(path, length=6) == []
