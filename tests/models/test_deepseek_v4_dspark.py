"""DeepSeek-V4's own DSpark drafter (`mtp.{i}.*` + `dspark_*` keys): loading and fit checks,
greedy identity with plain decoding under every verify policy (mid-batch joins, stop strings,
EOS inside a block, preemption), sampling checked by chi-squared with a negative control, the
oracle accept length, block logits against a dense reference, and the served counters."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.stats import chi2_contingency

import specserve.engine.engine as engine_mod
from specserve.config import ConfigError, SpecConfig
from specserve.core import Request, SamplingParams
from specserve.llm import LLM
from specserve.models.deepseek_v4 import HyperMix, V4Context, hyper_head
from specserve.speculative.base import DraftProposal
from specserve.speculative.block_drafter import DFlashDrafter
from specserve.speculative.calibration import save_sts
from specserve.speculative.deepseek_v4_dspark import DeepseekV4DSparkModel
from specserve.speculative.factory import build_speculation
from specserve.testing.tiny import TINY_DEEPSEEK_V4, TINY_V4_DSPARK, make_deepseek_v4_checkpoint

BLOCK = TINY_V4_DSPARK["dspark_block_size"]
WINDOW = TINY_DEEPSEEK_V4["sliding_window"]
PROMPTS = [[5, 6, 7, 8, 9], list(range(40, 63)), list(range(100, 138))]
MAX_TOKENS = [30, 12, 24]
POLICIES = ["full", "threshold", "scheduler"]


@pytest.fixture(scope="module")
def v4d(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("v4d") / "dsv4"
    return str(make_deepseek_v4_checkpoint(out, seed=0, mtp=False, dspark=True))


class TargetForced(DFlashDrafter):
    """The served drafter with its block logits forced to the target's (full no-cache forwards
    over the tokens drafted so far); `corrupt`: every third slot's logits are rolled by one
    token, so greedy windows are rejected part-way."""

    def __init__(self, inner: DFlashDrafter, corrupt: bool = False) -> None:
        super().__init__(inner.model, inner.block_size, inner.sts)
        self.target = inner.model.shared.target
        self.corrupt, self.slots, self.seqs = corrupt, 0, []

    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[DraftProposal]:
        self.deferred.fold(requests, self._catch_up)  # contexts are folded in lazily: now
        self.seqs = [
            list(r.all_token_ids)
            for r, m in zip(requests, max_tokens, strict=True)
            if min(self.block_size, m) > 0 and r.request_id in self.contexts
        ]
        self.model.markov_step = self._forced  # shadows the method for this call
        try:
            return super().propose(requests, max_tokens)
        finally:
            del self.model.markov_step

    def _forced(self, base, prev, hidden, state):
        seqs = (
            self.seqs if state is None else [s + [int(t)] for s, t in zip(state, prev, strict=True)]
        )
        lengths = [len(s) for s in seqs]  # one forward over all of them, laid out in turn
        ctx = V4Context.fresh(self.target, lengths)
        flat = torch.tensor([t for s in seqs for t in s])
        out = self.target(flat, torch.cat([torch.arange(n) for n in lengths]), ctx)
        last = torch.tensor(lengths).cumsum(0) - 1
        logits = self.target.compute_logits(out.hidden[last])
        self.slots += 1
        if self.corrupt and self.slots % 3 == 0:
            logits = logits.roll(1, dims=-1)
        return logits, seqs


def _llm(path: str, algorithm: str = "NONE", policy: str | None = None, **kw) -> LLM:
    llm = LLM(path, max_total_tokens=kw.pop("max_total_tokens", 2048), page_size=8, **kw)
    if algorithm != "NONE":
        spec = SpecConfig("DSPARK", path, verify_policy=policy, adaptive_drafting=False)
        drafter, planner = build_speculation(spec, llm.engine)
        if algorithm != "DSPARK":
            drafter = TargetForced(drafter, corrupt=algorithm == "oracle-corrupt")
        llm.engine.set_speculation(drafter, planner)
    return llm


def _greedy(max_tokens=MAX_TOKENS, **kw):
    return [SamplingParams(max_tokens=m, temperature=0, **kw) for m in max_tokens]


def _waves(llm: LLM) -> list[list[int]]:
    """Requests join while the engine runs: one, then the next two after three steps. The
    drafter's context caches never hold more than the window's `sliding_window - 1` rows."""
    eng, params = llm.engine, _greedy()
    reqs = [eng.add_request(PROMPTS[0], params[0])]
    for _ in range(3):
        eng.step()
    reqs += [eng.add_request(p, q) for p, q in zip(PROMPTS[1:], params[1:], strict=True)]
    while eng.has_unfinished():
        eng.step()
        rows = [c.positions.shape[0] for c in eng.drafter.contexts.values()]
        assert max(rows, default=0) <= WINDOW - 1
    return [r.output_token_ids for r in reqs]


def _kv_baseline(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert llm.engine.drafter.num_tracked_requests() == 0


@pytest.fixture(scope="module")
def reference(v4d):
    return [o.outputs[0].token_ids for o in _llm(v4d).generate(PROMPTS, _greedy())]


def test_loads_from_the_target_folder(v4d):
    llm = _llm(v4d, "DSPARK", "full")
    drafter = llm.engine.drafter
    assert isinstance(drafter, DFlashDrafter)
    assert isinstance(drafter.model, DeepseekV4DSparkModel)
    assert len(drafter.model.stages) == 3 and drafter.capture_layers == (1, 2, 3)
    assert drafter.model.confidence_head is not None
    assert drafter.max_draft_tokens == BLOCK


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("algorithm", ["DSPARK", "oracle-corrupt"])
def test_greedy_identical_to_plain(v4d, reference, algorithm, policy):
    llm = _llm(v4d, algorithm, policy, chunked_prefill_size=16)
    assert _waves(llm) == reference
    stats = llm.engine.stats
    assert stats.num_draft_tokens > 0
    if algorithm == "oracle-corrupt":  # windows accepted in part: the context replays past them
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    _kv_baseline(llm)


def test_oracle_accept_length_is_block_plus_one(v4d):
    llm = _llm(v4d, "oracle", "full")
    outs = llm.generate(PROMPTS, _greedy([1 + 5 * (BLOCK + 1)] * 3))
    stats = llm.engine.stats
    assert stats.num_drafts == stats.num_verify_passes > 0
    assert stats.avg_accept_length == BLOCK + 1
    assert stats.accepted_per_position == [stats.num_drafts] * BLOCK
    for o in outs:
        meta = o.meta_info[0]
        assert meta["spec_accept_length"] > BLOCK
        assert meta["spec_accept_length"] == len(o.outputs[0].token_ids) / meta["spec_verify_ct"]
    _kv_baseline(llm)


def test_stop_string_and_stop_token_inside_accepted_block(v4d, reference):
    plain = _llm(v4d)
    text = plain.generate(PROMPTS[0], _greedy([24])[0])[0].outputs[0].text
    cases = [
        SamplingParams(max_tokens=24, temperature=0, stop=(text[8:11],)),
        SamplingParams(max_tokens=24, temperature=0, stop_token_ids=(reference[0][9],)),
    ]
    for params in cases:
        want = plain.generate(PROMPTS[0], params)[0].outputs[0]
        for algorithm in ("DSPARK", "oracle"):
            llm = _llm(v4d, algorithm, "full")
            got = llm.generate(PROMPTS[0], params)[0].outputs[0]
            assert (got.token_ids, got.text, got.finish_reason) == (
                want.token_ids,
                want.text,
                want.finish_reason,
            )
            assert got.finish_reason == "stop"
            _kv_baseline(llm)


def test_eos_inside_accepted_block(v4d, reference, tmp_path):
    eos = reference[0][10]
    path = make_deepseek_v4_checkpoint(
        tmp_path / "eos", seed=0, mtp=False, dspark=True, eos_token_id=eos
    )
    want = _llm(str(path)).generate(PROMPTS[0], _greedy([24])[0])[0].outputs[0]
    assert want.finish_reason == "stop" and len(want.token_ids) <= 11
    llm = _llm(str(path), "oracle", "full")
    got = llm.generate(PROMPTS[0], _greedy([24])[0])[0].outputs[0]
    assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)
    assert llm.engine.stats.num_accepted_tokens > 0
    _kv_baseline(llm)


@pytest.mark.parametrize("algorithm", ["DSPARK", "oracle-corrupt"])
def test_preemption_under_speculation(v4d, reference, algorithm):
    llm = _llm(v4d, algorithm, "full", max_total_tokens=96)
    outs = llm.generate(PROMPTS, _greedy())
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == reference
    _kv_baseline(llm)


def test_sts_temperatures_calibrate_its_confidence_head(v4d, reference, tmp_path):
    temps = torch.tensor([0.5, 1.0, 2.0, 4.0])
    save_sts(tmp_path / "sts.json", temps)
    llm = LLM(v4d, max_total_tokens=2048, page_size=8)
    sts = str(tmp_path / "sts.json")
    spec = SpecConfig("DSPARK", v4d, verify_policy="threshold", confidence_sts_path=sts)
    drafter, planner = build_speculation(spec, llm.engine)
    torch.testing.assert_close(drafter.sts, temps)
    seen = []
    propose = drafter.propose

    def spy(requests, max_tokens):
        out = propose(requests, max_tokens)
        seen.extend((len(p.tokens), p.confidences) for p in out if p.tokens)
        return out

    drafter.propose = spy
    llm.engine.set_speculation(drafter, planner)
    outs = llm.generate(PROMPTS[:1], _greedy([12]))
    assert outs[0].outputs[0].token_ids == reference[0][:12]
    # one confidence per kept draft; whole blocks until the request's end leaves less room
    assert any(n == BLOCK for n, _ in seen)
    assert all(c.shape == (n,) and bool(((c > 0) & (c < 1)).all()) for n, c in seen)


# -- fit checks and folders ------------------------------------------------------------------------


def _separate_folder(v4d: str, dest: Path, **config) -> Path:
    dest.mkdir()
    raw = {**json.loads((Path(v4d) / "config.json").read_text()), **config}
    (dest / "config.json").write_text(json.dumps(raw))
    shutil.copy(Path(v4d) / "dspark.safetensors", dest / "dspark.safetensors")
    return dest


def test_separate_drafter_folder(v4d, reference, tmp_path):
    folder = _separate_folder(v4d, tmp_path / "drafter")
    llm = LLM(v4d, max_total_tokens=2048, page_size=8)
    spec = SpecConfig("DSPARK", str(folder), verify_policy="full")
    llm.engine.set_speculation(*build_speculation(spec, llm.engine))
    outs = llm.generate(PROMPTS[:1], _greedy([12]))
    assert outs[0].outputs[0].token_ids == reference[0][:12]
    assert llm.engine.stats.num_draft_tokens > 0


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"hidden_size": 64}, "hidden_size is 64"),
        ({"hc_mult": 4}, "hc_mult is 4"),
        ({"dspark_target_layer_ids": [2, 3, 4]}, "dspark_target_layer_ids"),
        ({"dspark_noise_token_id": 9999}, "dspark_noise_token_id"),
        ({"dspark_markov_rank": 8}, r"mtp\.2\.\S+ has shape \[1, 144\]|mtp\.2\.markov_head"),
    ],
)
def test_misfit_drafter_is_refused_naming_the_field(v4d, tmp_path, config, needle):
    folder = _separate_folder(v4d, tmp_path / "bad", **config)
    llm = LLM(v4d, max_total_tokens=256, page_size=8)
    with pytest.raises(ConfigError, match=needle):
        build_speculation(SpecConfig("DSPARK", str(folder)), llm.engine)


def test_missing_stage_weight_is_named(v4d, tmp_path):
    folder = _separate_folder(v4d, tmp_path / "lacking")
    state = load_file(str(folder / "dspark.safetensors"))
    del state["mtp.2.attn.wkv.weight"]
    save_file(state, str(folder / "dspark.safetensors"))
    llm = LLM(v4d, max_total_tokens=256, page_size=8)
    with pytest.raises(ConfigError, match="lacks mtp.2.attn.wkv.weight"):
        build_speculation(SpecConfig("DSPARK", str(folder)), llm.engine)


def test_target_without_dspark_keys_is_a_clear_error(tmp_path):
    path = make_deepseek_v4_checkpoint(tmp_path / "plain", seed=1, mtp=False)
    llm = LLM(str(path), max_total_tokens=256, page_size=8)
    with pytest.raises(ConfigError, match="no dspark_block_size"):
        build_speculation(SpecConfig("DSPARK", str(path)), llm.engine)


# -- block logits against a dense reference ----------------------------------------------------


def _rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, inverse=False):
    """SGLang's `apply_rotary_emb` on the last 2 * len(inv_freq) dims: complex multiplication."""
    rd = 2 * inv_freq.shape[0]
    freqs = torch.polar(torch.ones(pos.shape[0], rd // 2), pos[:, None].float() * inv_freq)
    if inverse:
        freqs = freqs.conj()
    while freqs.dim() < x.dim():
        freqs = freqs.unsqueeze(1)
    z = torch.view_as_complex(x[..., -rd:].float().unflatten(-1, (-1, 2)).contiguous())
    return torch.cat([x[..., :-rd], torch.view_as_real(z * freqs).flatten(-2)], dim=-1)


def _rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return x if w is None else x * w


def _dense_attention(attn, x, pos, main_x, ctx_pos, inv_freq, eps):
    """Queries of the block over [context K from main_x; block K], K = V, sinks, window."""
    h, d, g = attn.num_heads, attn.head_dim, attn.groups
    q = F.linear(_rms(F.linear(x, attn.wq_a.weight), attn.q_norm.weight, eps), attn.wq_b.weight)
    q = _rope(_rms(q.view(-1, h, d), None, eps), pos, inv_freq)

    def kv(inp, p):
        return _rope(_rms(F.linear(inp, attn.wkv.weight), attn.norm.weight, eps), p, inv_freq)

    keys = torch.cat([kv(main_x, ctx_pos), kv(x, pos)])
    key_pos = torch.cat([ctx_pos, pos])
    in_block = torch.cat([torch.zeros_like(ctx_pos), torch.ones_like(pos)]).bool()
    visible = in_block[None, :] | (pos[:, None] - key_pos[None, :] < attn.window)
    scores = torch.einsum("qhd,kd->hqk", q, keys) / d**0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = attn.attn_sink.view(h, 1, 1).expand(h, q.shape[0], 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    o = _rope(torch.einsum("hqk,kd->qhd", probs, keys), pos, inv_freq, inverse=True)
    wo_a = attn.wo_a.weight.view(g, -1, h * d // g)
    o = torch.einsum("bgd,grd->bgr", o.reshape(-1, g, h * d // g), wo_a)
    return F.linear(o.flatten(1), attn.wo_b.weight)


def _dense_block_logits(model, target, captured, anchor, tokens):
    """Block logits of one request from SGLang's / vLLM's equations, fp32."""
    v4, eps, k = model.v4, model.v4.rms_norm_eps, tokens.shape[0]
    n_ctx = captured.shape[0]
    ctx_pos = torch.arange(n_ctx)
    feats = captured.view(n_ctx, len(model.stages), v4.hc_mult, -1).mean(dim=2).flatten(1)
    main_x = _rms(F.linear(feats, model.main_proj.weight), model.main_norm.weight, eps)
    ids = torch.tensor([anchor] + [model.config.noise_token_id] * (k - 1))
    pos = n_ctx + torch.arange(k)
    inv_freq = target.ropes["main"].inv_freq
    streams = target.embed(ids)[:, None].repeat(1, v4.hc_mult, 1)
    for st in model.stages:
        mix = [getattr(st, f"hc_attn_{p}") for p in ("fn", "base", "scale")]
        post, comb, x = HyperMix.weights(streams, *mix, v4.hc_sinkhorn_iters, v4.hc_eps, eps)
        out = _dense_attention(
            st.attn, _rms(x, st.attn_norm.weight, eps), pos, main_x, ctx_pos, inv_freq, eps
        )
        streams = HyperMix.combine(streams, out, post, comb)
        mix = [getattr(st, f"hc_ffn_{p}") for p in ("fn", "base", "scale")]
        post, comb, x = HyperMix.weights(streams, *mix, v4.hc_sinkhorn_iters, v4.hc_eps, eps)
        streams = HyperMix.combine(
            streams, st.ffn(_rms(x, st.ffn_norm.weight, eps), ids), post, comb
        )
    head = (model.hc_head_fn, model.hc_head_base, model.hc_head_scale)
    x = hyper_head(streams, *head, v4)
    base = F.linear(_rms(x, model.norm.weight, eps), target.head.weight)
    prev = torch.cat([torch.tensor([anchor]), tokens[:-1]])
    w1, w2 = model.markov_head.markov_w1.weight, model.markov_head.markov_w2.weight
    logits = base + F.linear(w1[prev], w2)
    conf = F.linear(torch.cat([x, w1[prev]], dim=-1), model.confidence_head.proj.weight)
    return logits, conf.squeeze(-1)


@torch.inference_mode()
def test_block_logits_match_a_dense_reference(v4d):
    llm = _llm(v4d, "DSPARK", "full")
    model = llm.engine.drafter.model
    target = model.shared.target
    prompt = list(range(60, 60 + 24))  # longer than the 16-token window
    ctx = V4Context.fresh(target, [len(prompt)])
    captured = target(torch.tensor(prompt), torch.arange(len(prompt)), ctx, (1, 2, 3)).captured
    n_ctx, anchor = len(prompt) - 1, prompt[-1]
    rows = model.context_kv(captured[:n_ctx], torch.arange(n_ctx))
    hidden = model.draft_hidden(torch.tensor([anchor]), torch.tensor([n_ctx]), [rows], BLOCK)
    tokens, logits = model.draft(hidden, torch.tensor([anchor]), lambda x: (x.argmax(-1), x))
    conf = model.block_confidence_logits(hidden, torch.tensor([anchor]), tokens)
    kept = [(t[0][-(WINDOW - 1) :],) for t in rows]  # what the served context cache keeps
    torch.testing.assert_close(
        model.draft_hidden(torch.tensor([anchor]), torch.tensor([n_ctx]), [kept], BLOCK), hidden
    )
    want_logits, want_conf = _dense_block_logits(model, target, captured[:n_ctx], anchor, tokens[0])
    torch.testing.assert_close(logits[0], want_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(conf[0], want_conf, rtol=0, atol=1e-4)
    # the sliding window (16): rows 0..7 are out of every block query's reach, row 20 is not
    for row, changes in ((3, False), (20, True)):
        moved = captured[:n_ctx].clone()
        moved[row] += 1.0
        got = _dense_block_logits(model, target, moved, anchor, tokens[0])[0]
        assert torch.allclose(got, want_logits, atol=1e-5) != changes


# -- sampling ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """The fixture with its head scaled up, so temperature-1 outputs suit a chi-squared test."""
    out = make_deepseek_v4_checkpoint(
        tmp_path_factory.mktemp("peaked") / "dsv4", seed=0, mtp=False, dspark=True
    )
    state = load_file(str(out / "model.safetensors"))
    state["head.weight"] = state["head.weight"] * 40
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def _samples(path: str, algorithm: str, n: int = 200) -> tuple[list, LLM]:
    llm = _llm(path, algorithm, "full", max_running_requests=128)
    # room for one whole block after the prefill's token: no drafts past a request's last token
    params = [
        SamplingParams(max_tokens=BLOCK + 2, temperature=1.0, seed=10_000 + i) for i in range(n)
    ]
    outs = llm.generate([PROMPTS[0]] * n, params)
    return [tuple(o.outputs[0].token_ids[1:3]) for o in outs], llm  # first verify pass


def _p_value(a: list, b: list) -> float:
    ca, cb = Counter(a), Counter(b)
    keys = sorted(set(ca) | set(cb), key=lambda k: -(ca[k] + cb[k]))
    big = [k for k in keys if ca[k] + cb[k] >= 10]
    rows = [[ca[k] for k in big], [cb[k] for k in big]]
    rest = (len(a) - sum(rows[0]), len(b) - sum(rows[1]))
    if sum(rest):
        rows[0].append(rest[0])
        rows[1].append(rest[1])
    assert len(rows[0]) >= 3, "outputs too spread for a chi-squared test"
    return float(chi2_contingency(rows).pvalue)


@pytest.fixture(scope="module")
def plain_samples(peaked):
    return _samples(peaked, "NONE")[0]


@pytest.mark.parametrize("algorithm", ["DSPARK", "oracle-corrupt"])
def test_sampling_follows_the_target(peaked, plain_samples, algorithm):
    """The random drafter's peaked guesses are all rejected (the resampling path); the corrupted
    oracle's are kept in part, so sampled windows are accepted part-way."""
    spec, llm = _samples(peaked, algorithm)
    stats = llm.engine.stats
    assert stats.num_draft_tokens > 0
    if algorithm == "oracle-corrupt":
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert _p_value(plain_samples, spec) > 1e-3


def test_chi2_detects_a_lossy_verifier(peaked, plain_samples, monkeypatch):
    """Negative control: keeping every DSpark draft token (no rejection) must be detected."""

    def accept_all(draft_tokens, draft_lens, q, p, generators):
        out = torch.full((draft_tokens.shape[0], draft_tokens.shape[1] + 1), -1)
        for r in range(draft_tokens.shape[0]):
            n = int(draft_lens[r])
            out[r, :n] = draft_tokens[r, :n]
            out[r, n] = int(torch.multinomial(p[r, n], 1, generator=generators[r]))
        return out, draft_lens + 1

    monkeypatch.setattr(engine_mod, "rejection_verify", accept_all)
    assert _p_value(plain_samples, _samples(peaked, "DSPARK")[0]) < 1e-3


# -- serving -------------------------------------------------------------------------------------


def test_serve_with_no_draft_path_reports_spec_counters(v4d):
    """`specserve serve --model-path V4_DIR --speculative-algorithm DSPARK`: the drafter comes
    from the target folder; /metrics and each choice's meta_info carry the counters."""
    from fastapi.testclient import TestClient

    from specserve.cli import build_parser
    from specserve.server.api import ServerConfig, create_app
    from specserve.server.async_engine import AsyncEngine
    from specserve.server.cli import build_engine

    argv = ["serve", "--model-path", v4d, "--speculative-algorithm", "DSPARK"]
    argv += ["--speculative-verify-policy", "full", "--max-total-tokens", "1024"]
    engine, algorithm = build_engine(build_parser().parse_args(argv))
    assert algorithm == "DSPARK" and isinstance(engine.drafter.model, DeepseekV4DSparkModel)
    served = AsyncEngine(engine)
    served.start()
    try:
        with TestClient(create_app(served, ServerConfig("v4"))) as client:
            body = {"prompt": [5, 6, 7, 8], "max_tokens": 10, "ignore_eos": True}
            choice = client.post("/v1/completions", json=body).json()["choices"][0]
            metrics = client.get("/metrics").text
    finally:
        served.shutdown()
    assert choice["meta_info"]["spec_verify_ct"] > 0
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("specserve:spec_decode_")
    }
    assert values["specserve:spec_decode_num_drafts_total"] > 0
    assert values["specserve:spec_decode_num_draft_tokens_total"] > 0
    assert "specserve:spec_decode_accept_length" in values
