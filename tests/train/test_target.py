"""Corpus -> tokenizer -> target, through the CLI; the result loads in transformers."""

from __future__ import annotations

import json

import pytest
import torch

from specserve.cli import main
from specserve.models.attention import CausalAttention
from specserve.models.loader import load_model
from specserve.train.runlog import read_jsonl

RUN = {
    "model": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
    },
    "train": {"steps": 6, "batch_size": 4, "seq_len": 32, "lr": 1e-2, "warmup": 1},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import inspect
    import textwrap

    root = tmp_path_factory.mktemp("corpus")
    src = inspect.getsource(textwrap).split("\n\n")
    for i, chunk in enumerate(src):
        (root / "code" / f"m{i}.py").parent.mkdir(exist_ok=True)
        (root / "code" / f"m{i}.py").write_text(chunk * 3)
    (root / "tok").mkdir()
    assert (
        main(
            [
                "train",
                "tokenizer",
                "--corpus",
                str(root / "code"),
                "--vocab-size",
                "300",
                "--out",
                str(root / "tok"),
            ]
        )
        == 0
    )
    (root / "run.json").write_text(json.dumps(RUN))
    return root


def _train(corpus, out, *extra):
    return main(
        [
            "train",
            "target",
            "--corpus",
            str(corpus / "code"),
            "--tokenizer",
            str(corpus / "tok"),
            "--config",
            str(corpus / "run.json"),
            "--out",
            str(out),
            *extra,
        ]
    )


def test_target_trains_and_loads_in_transformers(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert _train(corpus, tmp_path / "t") == 0
    log = json.loads((tmp_path / "t" / "train_log.json").read_text())
    assert log["log"][-1]["loss"] < log["log"][0]["loss"]
    ours, _ = load_model(tmp_path / "t")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "t").eval()
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        out = ours(ids[0], torch.arange(20), CausalAttention(1, 20))
        mine = ours.compute_logits(out.hidden)
        theirs = hf(ids).logits[0]
    assert torch.allclose(mine, theirs, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>user")


def test_target_resume_matches_an_uninterrupted_run(corpus, tmp_path, monkeypatch):
    from specserve.train import loop

    assert _train(corpus, tmp_path / "full") == 0
    real = loop.Progress.update
    calls = []

    def update(self, *a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(loop.Progress, "update", update)
    run = json.loads((corpus / "run.json").read_text())
    run["train"]["checkpoint_minutes"] = 0.0
    (corpus / "run0.json").write_text(json.dumps(run))
    args = ["--config", str(corpus / "run0.json")]
    out = str(tmp_path / "r")
    base = ["train", "target", "--corpus", str(corpus / "code"), "--tokenizer", str(corpus / "tok")]
    assert main([*base, *args, "--out", out]) == 130  # Ctrl-C
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)["step"] == 3
    monkeypatch.setattr(loop.Progress, "update", real)
    assert main([*base, *args, "--out", out, "--resume"]) == 0
    a, _ = load_model(tmp_path / "full")
    b, _ = load_model(tmp_path / "r")
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)


def test_init_from_continues_a_curriculum(corpus, tmp_path, capsys):
    """A second phase (longer sequences) starts from the first phase's weights: its first loss
    is the trained model's, not a random init's; a folder of another shape is refused."""
    assert _train(corpus, tmp_path / "short") == 0
    short = json.loads((tmp_path / "short" / "train_log.json").read_text())["log"]
    run = json.loads((corpus / "run.json").read_text())
    run["train"] |= {"seq_len": 64, "steps": 2}
    (corpus / "long.json").write_text(json.dumps(run))
    base = ["train", "target", "--corpus", str(corpus / "code"), "--tokenizer", str(corpus / "tok")]
    long = [*base, "--config", str(corpus / "long.json"), "--out", str(tmp_path / "long")]
    assert main([*long, "--init-from", str(tmp_path / "short")]) == 0
    first = json.loads((tmp_path / "long" / "train_log.json").read_text())["log"][0]["loss"]
    assert first < short[0]["loss"] - 0.5  # random init starts near ln(300) = 5.7
    run["model"]["hidden_size"] = 64
    (corpus / "wide.json").write_text(json.dumps(run))
    wide = [*base, "--config", str(corpus / "wide.json"), "--out", str(tmp_path / "wide")]
    assert main([*wide, "--init-from", str(tmp_path / "short")]) == 2
    assert "the weights do not fit the model" in capsys.readouterr().err


def test_bad_config_is_a_cli_error(corpus, tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"train": {"stepz": 3}}')
    rc = main(
        [
            "train",
            "target",
            "--corpus",
            str(corpus / "code"),
            "--tokenizer",
            str(corpus / "tok"),
            "--config",
            str(tmp_path / "bad.json"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "stepz" in capsys.readouterr().err


def test_accumulated_micro_batches_train_the_same_target(corpus, tmp_path):
    """Global batch 4 as one batch and as two accumulated micro-batches of 2 (what each of 2
    torchrun processes would run; `tests/train/test_parallel.py` runs 2 processes)."""
    assert _train(corpus, tmp_path / "whole", "--threads", "1") == 0
    flags = ["--global-batch-size", "4", "--local-batch-size", "2", "--threads", "1"]
    assert _train(corpus, tmp_path / "micro", *flags) == 0
    whole = read_jsonl(tmp_path / "whole" / "train_log.jsonl")
    micro = read_jsonl(tmp_path / "micro" / "train_log.jsonl")
    assert len(whole) == len(micro) == RUN["train"]["steps"]
    for a, b in zip(whole, micro, strict=True):  # float32 sums in another order
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
