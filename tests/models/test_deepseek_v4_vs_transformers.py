"""DeepSeek-V4 against transformers 5.24 on the issue-16 tiny checkpoint (fp32, random weights).

The reference is always transformers' full forward over the true sequence (no cache); ours runs
through its serving state: batched prefill of mixed lengths, chunked prefill, decoding across
compression windows, and verify windows whose rejected drafts are rolled back.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from specserve.models.deepseek_v4 import DeepseekV4ForCausalLM, V4Context
from specserve.models.loader import load_model

TOL = 1e-4


@pytest.fixture(scope="module")
def models(tiny_v4_path):
    ours, _ = load_model(tiny_v4_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_v4_path, dtype=torch.float32)
    return ours, ref.eval()


def _truth(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _ref_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids]), use_cache=False).logits[0]


def _run(ours, states, step):
    """One forward; step = [(sequence, start, tokens)] -> logits per entry."""
    ctx = V4Context.for_states(
        [states[i] for i, _, _ in step], [s for _, s, _ in step], [len(t) for _, _, t in step]
    )
    ids = torch.tensor([t for _, _, toks in step for t in toks])
    pos = torch.tensor([p for _, s, toks in step for p in range(s, s + len(toks))])
    with torch.no_grad():
        logits = ours.compute_logits(ours(ids, pos, ctx).hidden)
    return logits.split([len(t) for _, _, t in step])


def test_registered_and_loads_save_pretrained_names(models):
    ours, _ = models
    assert isinstance(ours, DeepseekV4ForCausalLM)
    names = dict(ours.named_parameters())
    assert "layers.1.attn.indexer.compressor.ape" in names and "hc_head_fn" in names
    assert ours.checkpoint_key("model.hc_head.hc_fn") == "hc_head_fn"
    assert ours.checkpoint_key("mtp.0.eh_proj.weight") is None


def test_full_prefill_matches(models):
    ours, ref = models
    ids = _truth(45, 0)
    (got,) = _run(ours, [ours.new_state()], [(0, 0, ids)])
    assert (got - _ref_logits(ref, ids)).abs().max().item() <= TOL


def test_batched_prefill_of_mixed_lengths_matches(models):
    ours, ref = models
    seqs = [_truth(n, 10 + n) for n in (3, 29, 17, 40)]
    states = [ours.new_state() for _ in seqs]
    got = _run(ours, states, [(i, 0, s) for i, s in enumerate(seqs)])
    for g, s in zip(got, seqs, strict=True):
        assert (g - _ref_logits(ref, s)).abs().max().item() <= TOL


def test_chunked_prefill_matches(models):
    ours, ref = models
    ids = _truth(50, 1)
    state, got, pos = ours.new_state(), [], 0
    for chunk in (5, 11, 3, 16, 15):  # boundaries inside and across compression windows
        got += _run(ours, [state], [(0, pos, ids[pos : pos + chunk])])
        pos += chunk
    assert (torch.cat(got) - _ref_logits(ref, ids)).abs().max().item() <= TOL


def test_prefill_then_40_decodes_matches(models):
    """40 single-token steps cross 10 CSA and 5 HCA windows and slide the 16-token window."""
    ours, ref = models
    seqs = [_truth(47, 2), _truth(53, 3)]
    states = [ours.new_state(), ours.new_state()]
    prompt = [7, 13]
    got = [
        list(g) for g in _run(ours, states, [(i, 0, s[: prompt[i]]) for i, s in enumerate(seqs)])
    ]
    for k in range(40):
        step = [(i, prompt[i] + k, [s[prompt[i] + k]]) for i, s in enumerate(seqs)]
        for i, g in enumerate(_run(ours, states, step)):
            got[i].append(g)
    for i, s in enumerate(seqs):
        want = _ref_logits(ref, s)[: prompt[i] + 40]
        assert (torch.cat([g.view(-1, want.shape[1]) for g in got[i]]) - want).abs().max() <= TOL


def test_verify_windows_with_rollback_mid_window(models):
    """Two requests verify windows of different lengths in one batch; drafts are rejected so
    that the rollback lands inside a compression window whose entry the rejected tokens had
    completed; decoding then continues and still matches."""
    ours, ref = models
    truth = [_truth(60, 4), _truth(60, 5)]
    wants = [_ref_logits(ref, t) for t in truth]
    states = [ours.new_state(), ours.new_state()]
    _run(ours, states, [(0, 0, truth[0][:21]), (1, 0, truth[1][:14])])

    def window(i, start, n_good, n_bad):
        good = truth[i][start : start + 1 + n_good]
        bad = [(t + 1) % 512 for t in truth[i][start + 1 + n_good : start + 1 + n_good + n_bad]]
        return (i, start, good + bad)

    # request 0: positions 21..25 (CSA window [20, 24) and HCA window [16, 24) complete at 23),
    # only 1 draft accepted -> back to 23 tokens. Request 1: 14..16, all accepted.
    step = [window(0, 21, 1, 3), window(1, 14, 2, 0)]
    got = _run(ours, states, step)
    assert (got[0][:2] - wants[0][21:23]).abs().max() <= TOL
    assert (got[1] - wants[1][14:17]).abs().max() <= TOL
    assert states[0].layers[1].compressor.num_entries == 6  # the rejected tokens' entry
    pos = [23, 17]
    for _ in range(3):  # more verify rounds, each rejecting at a different place
        step = [window(0, pos[0], 2, 2), window(1, pos[1], 0, 4)]
        got = _run(ours, states, step)
        for i, n_ok in ((0, 3), (1, 1)):
            assert (got[i][:n_ok] - wants[i][pos[i] : pos[i] + n_ok]).abs().max() <= TOL
            pos[i] += n_ok
    while pos[0] < 50:  # then plain decoding
        got = _run(ours, states, [(i, pos[i], [truth[i][pos[i]]]) for i in range(2)])
        for i in range(2):
            assert (got[i] - wants[i][pos[i]]).abs().max() <= TOL
            pos[i] += 1
    assert states[0].layers[1].compressor.num_entries == 50 // 4


def test_state_stays_bounded(models):
    """The window and the raw compressor rows do not grow with the sequence."""
    ours, _ = models
    ids = _truth(200, 6)
    state = ours.new_state()
    _run(ours, [state], [(0, 0, ids[:100])])
    for p in range(100, 200):
        _run(ours, [state], [(0, p, [ids[p]])])
    state.prepare(200, 0)
    for layer in state.layers:
        assert layer.window.shape[0] == 15
        for comp in layer.compressors():
            assert comp.raw_kv.shape[0] < 2 * comp.ratio


def test_bfloat16_keeps_transformers_float32_parameters(models, tiny_v4_path):
    """--dtype bfloat16: hyper-connection, sink, compressor-bias and router-bias parameters stay
    float32 (as transformers keeps them); our bf16 logits are no further from the fp32 reference
    than transformers' own bf16 run is."""
    _, ref = models
    ours, _ = load_model(tiny_v4_path, dtype=torch.bfloat16)
    assert ours.layers[0].attn.wq_a.weight.dtype == torch.bfloat16
    for p in (ours.layers[1].hc_ffn_fn, ours.layers[1].attn.attn_sink, ours.hc_head_base):
        assert p.dtype == torch.float32
    assert ours.layers[1].attn.compressor.ape.dtype == torch.float32
    ref16 = transformers.AutoModelForCausalLM.from_pretrained(tiny_v4_path, dtype=torch.bfloat16)
    ids = _truth(40, 7)
    want = _ref_logits(ref, ids)
    (got,) = _run(ours, [ours.new_state()], [(0, 0, ids)])
    hf16 = _ref_logits(ref16.eval(), ids).float()
    assert (got - want).abs().max() <= 1.5 * (hf16 - want).abs().max()
