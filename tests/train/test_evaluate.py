"""Offline evaluation and the calibrate / eval commands."""

from __future__ import annotations

import json

import torch

from specserve.cli import main
from specserve.models.attention import CausalAttention
from specserve.models.loader import load_model
from specserve.train.evaluate import (
    BranchAttention,
    Drafts,
    RecordingCausal,
    RoundStats,
    target_accept_probs,
    walk_rounds,
)
from specserve.train.gendata import generate


def test_branch_probabilities_equal_a_direct_forward(tiny_target):
    target, _ = load_model(tiny_target)
    seqs = torch.randint(3, 500, (2, 14))
    anchors = torch.tensor([[4, 9], [6, 7]])
    tokens = torch.randint(3, 500, (2, 2, 3))
    q = torch.full((2, 2, 3), 0.5)
    alpha = target_accept_probs(target, seqs, anchors, Drafts(tokens, q, None))
    for b in range(2):
        for a in range(2):
            i = int(anchors[b, a])
            ids = torch.cat([seqs[b, : i + 1], tokens[b, a, :2]])
            out = target(ids, torch.arange(len(ids)), CausalAttention(1, len(ids)))
            p = target.compute_logits(out.hidden[i:]).softmax(-1)  # rows i, i+1, i+2
            want = (p[torch.arange(3), tokens[b, a]] / 0.5).clamp(max=1)
            assert torch.allclose(alpha[b, a], want, atol=1e-5)


def test_branch_attention_grows_row_by_row(tiny_target):
    """Two one-row forwards through a BranchAttention equal one two-row forward."""
    target, _ = load_model(tiny_target)
    seqs = torch.randint(3, 500, (1, 10))
    rec = RecordingCausal(1, 10)
    target(seqs[0], torch.arange(10), rec)
    anchors = torch.tensor([[5]])
    toks = torch.tensor([11, 12])
    both = target(toks, torch.tensor([6, 7]), BranchAttention(rec, anchors + 1)).hidden
    br = BranchAttention(rec, anchors + 1)
    one = target(toks[:1], torch.tensor([6]), br).hidden
    two = target(toks[1:], torch.tensor([7]), br).hidden
    assert torch.allclose(torch.cat([one, two]), both, atol=1e-5)


def test_rounds_walk_hand_case():
    alpha = torch.tensor(
        [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0, 0, 0], [0, 0, 0]]
    )
    st = RoundStats(3)
    walk_rounds(alpha, 0, torch.Generator(), st)  # rounds at 0 (3 tokens), 3 (4 tokens)
    assert st.rounds == 2 and st.tau == 3.5
    assert st.conditional == [1.0, 1.0, 0.5]


def test_generate_with_cache_equals_full_recompute(tiny_target):
    target, _ = load_model(tiny_target)
    prompts = torch.randint(3, 500, (3, 6))
    fast = generate(target, prompts, 8, 0.0)
    seq = prompts
    for _ in range(8):
        b, t = seq.shape
        out = target(seq.reshape(-1), torch.arange(t).repeat(b), CausalAttention(b, t))
        nxt = target.compute_logits(out.hidden.view(b, t, -1)[:, -1]).argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(fast, seq)


def test_calibrate_and_eval_commands(tiny_target, tiny_data, tmp_path, capsys):
    common = ["--target", tiny_target, "--data", tiny_data]
    assert (
        main(
            [
                "train",
                "drafter",
                "--algorithm",
                "dspark",
                *common,
                "--out",
                str(tmp_path / "d"),
                "--block-size",
                "3",
                "--markov-rank",
                "8",
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--target-layer-ids",
                "0",
                "2",
            ]
        )
        == 0
    )
    assert main(["train", "calibrate", "--drafter", str(tmp_path / "d"), "--data", tiny_data]) == 0
    sts = json.loads((tmp_path / "d" / "sts.json").read_text())
    assert len(sts["temperatures"]) == 3 and len(sts["ece_after"]) == 3
    assert all(t > 0 for t in sts["temperatures"])
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "drafter",
                *common,
                "--drafter",
                str(tmp_path / "d"),
                "--temperature",
                "1",
                "--json",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "code" in text and "prose" in text and "tau" in text
    res = json.loads((tmp_path / "e.json").read_text())
    doms = res["domains"]
    assert sorted(doms) == ["all", "code", "prose"] and res["block_size"] == 3
    assert doms["code"]["rounds"] + doms["prose"]["rounds"] == doms["all"]["rounds"] > 0
    for d in doms.values():  # tau = 1 + sum_k prod_{j<=k} conditional_j (rounded to 3 places)
        survive = torch.tensor(d["conditional"], dtype=torch.float64).cumprod(0)
        assert len(d["conditional"]) == 3
        assert abs(d["tau"] - (1.0 + float(survive.sum()))) < 0.01
    assert main(["eval", "drafter", *common, "--drafter", str(tmp_path / "nope")]) == 2


def test_parallel_oracle_matches_exact_enumeration(tiny_target):
    """Block 2: the Monte Carlo oracle's expected accept length equals the exact one, where the
    slot-2 marginal and the acceptance are summed over the whole vocabulary."""
    from specserve.train.evaluate import expected_tau, parallel_oracle_alpha

    target, _ = load_model(tiny_target)
    seq = torch.randint(3, 500, (12,), generator=torch.Generator().manual_seed(1))
    anchors = torch.tensor([4, 9])
    gen = torch.Generator().manual_seed(0)
    alpha = parallel_oracle_alpha(target, seq, anchors, 2, 4096, gen, (1.0, 3.0), best=True)
    for j, a in enumerate(anchors.tolist()):
        ctx = seq[: a + 1]
        out = target(ctx, torch.arange(a + 1), CausalAttention(1, a + 1))
        p1 = target.compute_logits(out.hidden[-1:]).softmax(-1)[0]  # [V]
        v = p1.shape[0]
        ids = torch.cat([ctx.expand(v, -1), torch.arange(v)[:, None]], 1)  # every x1
        out = target(ids.reshape(-1), torch.arange(a + 2).repeat(v), CausalAttention(v, a + 2))
        p2 = target.compute_logits(out.hidden.view(v, a + 2, -1)[:, -1]).softmax(-1)  # [x1, V]
        m2 = p1 @ p2
        slot2 = float(p1 @ torch.minimum(m2[None], p2).sum(-1))  # P(accept slot 2)
        assert slot2 < 0.9  # the target's next token depends on x1: not a trivial case
        assert abs(float(alpha[0, j, :, 0].mean()) - 1.0) < 1e-6  # slot 1 is the target's own
        assert abs(float(expected_tau(alpha[0, j]).mean()) - (2.0 + slot2)) < 0.03
        # a sharpened marginal accepts less than the marginal itself; the q fitted to the
        # rollouts at least as much
        assert float(expected_tau(alpha[1, j]).mean()) < 2.0 + slot2 - 0.03
        assert float(expected_tau(alpha[2, j]).mean()) > 2.0 + slot2 - 0.02


def test_eval_reports_each_context_bucket_and_temperature(tiny_target, tiny_data, tmp_path, capsys):
    from specserve.speculative.checkpoint import save_drafter
    from specserve.train.drafter import DrafterSpec, build_drafter
    from specserve.train.evaluate import evaluate_drafter
    from specserve.train.gendata import dataset_meta, generate_dataset

    target, cfg = load_model(tiny_target)
    save_drafter(
        build_drafter(DrafterSpec("dflash", block_size=3), target, cfg.raw), tmp_path / "d"
    )
    short = tmp_path / "short"
    generate_dataset(tiny_target, dataset_meta(tiny_data)["prompts"], short, 6, 16, 1.0)
    args = ["--target", tiny_target, "--drafter", str(tmp_path / "d"), "--json"]
    argv = ["eval", "drafter", *args, str(tmp_path / "e.json"), "--data", tiny_data, str(short)]
    assert main([*argv, "--temperature", "0", "1"]) == 0
    runs = json.loads((tmp_path / "e.json").read_text())
    assert [(r["context"], r["temperature"]) for r in runs] == [(6, 0), (6, 1), (12, 0), (12, 1)]
    out = capsys.readouterr().out
    assert "context 6" in out and "context 12" in out
    alone = evaluate_drafter(tiny_target, tmp_path / "d", short, 1.0)
    assert runs[1]["domains"] == alone["domains"]  # a bucket is the plain evaluation of its data
