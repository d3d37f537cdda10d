"""Per-step logs: JSONL and TensorBoard hold the same records, a resume rewrites the redone
steps once, and `specserve train plot` draws either."""

from __future__ import annotations

import pytest

from specserve.cli import main
from specserve.train.runlog import RunLog, read_jsonl, read_tensorboard


def _write(out, steps, start=0, scale=1.0):
    log = RunLog(out, start)
    for s in steps:
        log.write({"step": s, "total": scale / (s + 1), "accept": 0.1 * s})
    log.close()


def test_jsonl_and_tensorboard_agree_and_resume_rewrites_once(tmp_path):
    _write(tmp_path, range(5))
    _write(tmp_path, range(3, 6), start=3, scale=2.0)  # resumed from the step-3 checkpoint
    rows = read_jsonl(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in rows] == list(range(6))
    assert rows[2]["total"] == 1 / 3 and rows[4]["total"] == 2 / 5
    tb = read_tensorboard(tmp_path / "tensorboard")
    assert [r["step"] for r in tb] == list(range(6))
    # one event file: with two, their order by name is not their order in time (see runlog)
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    for a, b in zip(rows, tb, strict=True):
        assert b["total"] == pytest.approx(a["total"], rel=1e-6)
        assert b["accept"] == pytest.approx(a["accept"], abs=1e-6)


def test_plot_command_draws_jsonl_and_tensorboard(tmp_path, capsys):
    _write(tmp_path / "run", range(4))
    for src in ("run", "run/train_log.jsonl", "run/tensorboard"):
        png = tmp_path / f"{src.replace('/', '_')}.png"
        assert main(["train", "plot", "--log", str(tmp_path / src), "--out", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code = main(
        ["train", "plot", "--log", str(tmp_path / "run"), "--out", "x.png", "--metrics", "tv"]
    )
    assert code == 2 and "no metric 'tv' (it has accept, total)" in capsys.readouterr().err
    assert main(["train", "plot", "--log", str(tmp_path / "nothing"), "--out", "x.png"]) == 2
