"""Offline evaluation of a drafter against its target: accept length and per-position acceptance.

For each sequence `prompt + target continuation` (generated at the evaluation temperature),
every position a of the continuation is an anchor: the drafter drafts K tokens from the
committed prefix x_0..x_a exactly as at serving time (DFlash/DSpark: one block over the target
context before a; DSpark: the Markov head left to right over its own draft tokens; MTP: the
module chained K times over its own draft tokens). Then:

* temperature 0: draft token k is accepted iff it equals the target's greedy token, which is the
  continuation itself, so the rounds walked along it are exactly those of greedy speculative
  decoding;
* temperature 1: the target scores the drafted tokens (one extra forward over all branches) and
  slot k is accepted with probability min(1, p_k / q_k) (lossless rejection sampling); a round
  counts its expected accept length, and the next round starts where seeded coin flips say.
  The committed history is the sampled continuation, a target sample like the real one.

Rounds start at the first generated token and advance by the accepted count + 1 (the bonus
token), so tau = committed tokens / rounds, as the engine reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specserve.models.attention import AttentionContext, CausalAttention
from specserve.train.drafter import target_states


class RecordingCausal(CausalAttention):
    """Causal attention over [B, T] that keeps every layer's K/V ([B, T, kv, d]) for branches."""

    def __init__(self, batch: int, seq_len: int) -> None:
        super().__init__(batch, seq_len)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer_idx, q, k, v):
        b, t = self.batch, self.seq_len
        self.kv[layer_idx] = (k.view(b, t, *k.shape[1:]), v.view(b, t, *v.shape[1:]))
        return super().attend(layer_idx, q, k, v)


class BranchAttention(AttentionContext):
    """A branches per sequence growing off a recorded prefix: branch (b, a) sees prefix rows
    < visible[b, a] and its own rows so far (causally). Each forward adds n rows per branch;
    rows are flattened as [B, A, n]."""

    def __init__(self, prefix: RecordingCausal, visible: torch.Tensor) -> None:
        self.prefix, self.visible = prefix, visible
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer_idx, q, k, v):
        b, a = self.visible.shape
        n = q.shape[0] // (b * a)
        pk, pv = self.prefix.kv[layer_idx]  # [B, T, kv, d]
        k, v = k.view(b, a, n, *k.shape[1:]), v.view(b, a, n, *v.shape[1:])
        if layer_idx in self.rows:
            old_k, old_v = self.rows[layer_idx]
            k, v = torch.cat([old_k, k], 2), torch.cat([old_v, v], 2)
        self.rows[layer_idx] = (k, v)
        s = k.shape[2]  # rows per branch so far; the new ones are the last n
        t = pk.shape[1]
        dev = q.device
        keys = torch.cat([pk[:, None].expand(b, a, *pk.shape[1:]), k], 2)  # [B, A, T+S, kv, d]
        vals = torch.cat([pv[:, None].expand(b, a, *pv.shape[1:]), v], 2)
        see_prefix = (
            torch.arange(t, device=dev)[None, None, None, :] < self.visible[..., None, None]
        )
        own = torch.arange(s, device=dev)[None, :] <= (s - n + torch.arange(n, device=dev))[:, None]
        mask = torch.cat([see_prefix.expand(b, a, n, t), own.expand(b, a, n, s)], -1)
        qq = q.view(b * a, n, *q.shape[1:]).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            qq,
            keys.reshape(b * a, t + s, *k.shape[3:]).transpose(1, 2),
            vals.reshape(b * a, t + s, *v.shape[3:]).transpose(1, 2),
            attn_mask=mask.reshape(b * a, 1, n, t + s),
            enable_gqa=True,
        )
        return out.transpose(1, 2).reshape(b * a * n, *q.shape[1:])


@dataclass
class Drafts:
    tokens: torch.Tensor  # [B, A, K] draft token for position anchor + k + 1
    q: torch.Tensor  # [B, A, K] probability the drafter gave that token
    confidence_logits: torch.Tensor | None  # [B, A, K] (DSpark)


def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator):
    """-> token [...], its probability [...] under softmax(logits) (greedy: 1). Sampling draws
    on the CPU with `gen`, so results do not depend on the device."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.ones(tok.shape, device=tok.device)
    probs = F.softmax(logits.float(), -1)
    flat = probs.reshape(-1, probs.shape[-1]).cpu()
    tok = torch.multinomial(flat, 1, generator=gen).view(probs.shape[:-1]).to(probs.device)
    return tok, probs.gather(-1, tok[..., None]).squeeze(-1)


@torch.no_grad()
def draft_blocks(drafter, seqs, feats, anchors, k, temperature, gen) -> Drafts:
    """DFlash / DSpark drafts of K tokens at every anchor [B, A]."""
    hidden, _, _ = drafter.run_blocks(seqs, feats, anchors)
    hidden = hidden[:, :, :k]
    anchor_tokens = seqs.gather(1, anchors)
    tokens, q = drafter.draft(hidden, anchor_tokens, lambda x: _pick(x, temperature, gen))
    return Drafts(tokens, q, drafter.block_confidence_logits(hidden, anchor_tokens, tokens))


@torch.no_grad()
def draft_mtp(mtp, seqs, last, anchors, k, temperature, gen) -> Drafts:
    """MTP chained k times at every anchor a: step 1 reads row a-1 (h_{a-1}, x_a); step s
    feeds back its own hidden state and draft token, seeing the module's K/V of rows < a."""
    b, t = seqs.shape
    rec = RecordingCausal(b, t - 1)
    x = mtp.combine(seqs[:, 1:], last[:, :-1]).reshape(b * (t - 1), -1)
    pos = torch.arange(t - 1, device=seqs.device).repeat(b)
    rows = mtp.layer(x, pos, rec).view(b, t - 1, -1)
    h = rows.gather(1, (anchors - 1)[..., None].expand(-1, -1, rows.shape[-1]))  # [B, A, H]
    branch = BranchAttention(rec, anchors)  # rows < a of the module's own cache
    tokens, q = mtp.draft(h, anchors, branch, k, lambda x: _pick(x, temperature, gen))
    return Drafts(tokens, q, None)


@torch.no_grad()
def target_accept_probs(target, seqs, anchors, drafts: Drafts) -> torch.Tensor:
    """min(1, p_k / q_k) for every slot: p from one target pass over the drafted branches."""
    b, t = seqs.shape
    a, k = drafts.tokens.shape[1:]
    rec = RecordingCausal(b, t)
    pos = torch.arange(t, device=seqs.device).repeat(b)
    main = target(seqs.reshape(-1), pos, rec).hidden.view(b, t, -1)
    h0 = main.gather(1, anchors[..., None].expand(-1, -1, main.shape[-1]))  # p for slot 1
    hs = [h0[:, :, None]]
    if k > 1:
        branch = BranchAttention(rec, anchors + 1)  # rows 0..a, then the drafted tokens
        ids = drafts.tokens[:, :, : k - 1].reshape(-1)
        bpos = (anchors[..., None] + 1 + torch.arange(k - 1, device=seqs.device)).reshape(-1)
        hs.append(target(ids, bpos, branch).hidden.view(b, a, k - 1, -1))
    p = F.softmax(target.compute_logits(torch.cat(hs, 2)), -1)
    p_tok = p.gather(-1, drafts.tokens[..., None]).squeeze(-1)
    return (p_tok / drafts.q.clamp_min(1e-12)).clamp(max=1.0)


def expected_tau(alpha: torch.Tensor) -> torch.Tensor:
    """alpha [..., K] per-slot acceptance probabilities of one round -> its expected accept
    length (bonus included) [...]."""
    return 1.0 + torch.cumprod(alpha, -1).sum(-1)


@dataclass
class RoundStats:
    """Sums over rounds; `tau` and `conditional` read them."""

    k: int
    rounds: int = 0
    committed: float = 0.0
    reached: torch.Tensor | None = None  # [K] expected rounds reaching slot k
    accepted: torch.Tensor | None = None  # [K] expected rounds accepting slot k

    def __post_init__(self) -> None:
        self.reached = torch.zeros(self.k, dtype=torch.float64)
        self.accepted = torch.zeros(self.k, dtype=torch.float64)

    def add(self, alpha: torch.Tensor) -> None:
        """alpha [K]: per-slot acceptance probabilities (0/1 when greedy) of one round."""
        alive = torch.cumprod(torch.cat([alpha.new_ones(1), alpha[:-1]]), 0).double()
        self.reached += alive
        self.accepted += alive * alpha.double()
        self.committed += float(expected_tau(alpha.double()))
        self.rounds += 1

    def merge(self, other: RoundStats) -> None:
        self.rounds += other.rounds
        self.committed += other.committed
        self.reached += other.reached
        self.accepted += other.accepted

    @property
    def tau(self) -> float:
        return self.committed / max(1, self.rounds)

    @property
    def conditional(self) -> list[float]:
        return [float(x) for x in self.accepted / self.reached.clamp_min(1e-12)]


def walk_rounds(alpha: torch.Tensor, start: int, gen: torch.Generator, stats: RoundStats) -> None:
    """alpha [A, K] for anchors start, start+1, ...: walk the rounds of one sequence."""
    i, n = 0, alpha.shape[0]
    while i < n:
        al = alpha[i]
        stats.add(al)
        flips = torch.rand(al.shape, generator=gen) < al
        acc = int(torch.cumprod(flips.long(), 0).sum())
        i += acc + 1


@torch.no_grad()
def drafts_and_alpha(target, drafter, kind, seqs, prompt_len, k, temperature, gen, anchors=None):
    """Drafts and acceptance probabilities [B, A, K] at `anchors` [B, A] (default: every
    position prompt_len .. T - k - 1)."""
    b, t = seqs.shape
    if anchors is None:
        anchors = torch.arange(prompt_len, t - k, device=seqs.device).expand(b, -1).contiguous()
    if kind == "mtp":
        _, last = target_states(target, seqs, (target.config.num_hidden_layers - 1,))
        drafts = draft_mtp(drafter, seqs, last, anchors, k, temperature, gen)
    else:
        feats, _ = target_states(target, seqs, drafter.config.target_layer_ids)
        drafts = draft_blocks(drafter, seqs, feats, anchors, k, temperature, gen)
    if temperature == 0:
        labels = seqs.gather(
            1, (anchors[..., None] + 1 + torch.arange(k, device=seqs.device)).view(b, -1)
        )
        alpha = (drafts.tokens == labels.view(b, -1, k)).float()
    else:
        alpha = target_accept_probs(target, seqs, anchors, drafts)
    return drafts, alpha


def evaluate_sequences(
    target,
    drafter,
    kind: str,
    seqs: torch.Tensor,
    prompt_len: int,
    k: int,
    temperature: float,
    batch_size: int = 8,
    seed: int = 0,
) -> RoundStats:
    """Accept-length statistics of one set of sequences [N, T] (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    stats = RoundStats(k)
    for i in range(0, len(seqs), batch_size):
        _, alpha = drafts_and_alpha(
            target, drafter, kind, seqs[i : i + batch_size], prompt_len, k, temperature, gen
        )
        for row in alpha.cpu():
            walk_rounds(row, 0, gen, stats)
    return stats


# -- the ceiling of a parallel drafter ---------------------------------------------------------
def best_single_q(p: torch.Tensor, init: torch.Tensor, steps: int = 80) -> torch.Tensor:
    """p [A, N, V]: the target's distributions for one slot after N sampled prefixes. -> the
    single q [A, V] with the highest mean acceptance sum_v min(q_v, p_nv) over those N, by
    gradient ascent from `init`. Fitted on the same samples, so it overstates the best a q
    drawn without the prefix can do, if anything."""
    with torch.enable_grad():
        z = init.clamp_min(1e-9).log().clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=0.05)
        for _ in range(steps):
            loss = -torch.minimum(F.softmax(z, -1)[:, None], p).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return F.softmax(z.detach(), -1)


@torch.no_grad()
def parallel_oracle_alpha(target, seq, anchors, k, rollouts, gen, betas=(1.0,), best=False):
    """What a parallel drafter (DFlash: slot k drawn without the tokens drawn at slots < k)
    could at best accept at temperature 1, at each anchor of one sequence [T].

    Its ideal slot-k distribution is the target's marginal over that slot: the target's
    next-token distribution averaged over `rollouts` target samples of slots 1..k-1 (full
    distributions averaged, not counts). Drafts are drawn from it (raised to each beta and
    renormalized; with `best`, also from `best_single_q`), `rollouts` per anchor, and verified
    as `target_accept_probs` does. -> per-slot acceptance [len(betas) (+1), A, rollouts, K]."""
    t, a = seq.shape[0], anchors.shape[0]
    rec = RecordingCausal(1, t)
    main = target(seq, torch.arange(t, device=seq.device), rec).hidden
    p1 = F.softmax(target.compute_logits(main[anchors]).float(), -1)  # [A, V]
    visible = (anchors + 1)[:, None].expand(a, rollouts).reshape(1, -1)

    def sample(probs):
        flat = probs.reshape(-1, probs.shape[-1]).cpu()
        return torch.multinomial(flat, 1, generator=gen).view(probs.shape[:-1]).to(seq.device)

    marg, fitted = [p1], [p1]
    branch = BranchAttention(rec, visible)
    tok = sample(p1[:, None].expand(a, rollouts, -1))  # [A, N]
    for s in range(1, k):
        pos = (anchors[:, None] + s).expand(a, rollouts).reshape(-1)
        h = target(tok.reshape(-1), pos, branch).hidden
        p = F.softmax(target.compute_logits(h).float(), -1).view(a, rollouts, -1)
        marg.append(p.mean(1))
        if best:
            fitted.append(best_single_q(p, marg[-1]))
        tok = sample(p)
    marg = torch.stack(marg, 1)  # [A, K, V]
    qs = [marg.pow(b) / marg.pow(b).sum(-1, keepdim=True) for b in betas]
    if best:
        qs.append(torch.stack(fitted, 1))
    out = []
    for q in qs:
        qe = q[:, None].expand(a, rollouts, k, -1)
        drafts = sample(qe)  # [A, M, K]
        q_tok = qe.gather(-1, drafts[..., None])[..., 0]
        ids = drafts[..., : k - 1].reshape(-1)
        pos = anchors[:, None, None] + 1 + torch.arange(k - 1, device=seq.device)
        h = target(ids, pos.expand(a, rollouts, k - 1).reshape(-1), BranchAttention(rec, visible))
        p_rest = F.softmax(target.compute_logits(h.hidden).float(), -1)
        p = torch.cat(
            [p1[:, None, None].expand(a, rollouts, 1, -1), p_rest.view(a, rollouts, k - 1, -1)], 2
        )
        p_tok = p.gather(-1, drafts[..., None])[..., 0]
        out.append((p_tok / q_tok.clamp_min(1e-12)).clamp(max=1.0))
    return torch.stack(out)


# -- folders in, tables out --------------------------------------------------------------------
def continuations(target, data_dir, temperature: float, batch_size: int = 32, seed: int = 0):
    """The data set's prompts continued by the target at `temperature` (cached in data_dir).
    -> seqs [N, T] long, prompt_len, domains."""
    from pathlib import Path

    from specserve.train.gendata import dataset_meta, generate, load_dataset

    data = load_dataset(data_dir)
    p = int(data["prompt_len"])
    new = int(dataset_meta(data_dir).get("max_new_tokens", data["input_ids"].shape[1] - p))
    cache = Path(data_dir) / f"eval_t{temperature:g}_s{seed}.pt"
    if cache.is_file():
        seqs = torch.load(cache)
    else:
        prompts = data["input_ids"][:, :p].long()
        dev = next(target.parameters()).device
        parts = [
            generate(target, prompts[i : i + batch_size].to(dev), new, temperature, seed + i).cpu()
            for i in range(0, len(prompts), batch_size)
        ]
        seqs = torch.cat(parts)
        torch.save(seqs, cache)
    return seqs, p, list(data["domains"])


def evaluate_drafter(
    target_dir,
    drafter_dir,
    data_dir,
    temperature: float = 0.0,
    block_size: int | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Per domain (and 'all'): tau, conditional acceptance per position, rounds."""
    from specserve.models.loader import load_model
    from specserve.speculative.checkpoint import kind_of, load_drafter, read_config
    from specserve.speculative.handle import TargetHandle

    target, _ = load_model(target_dir, device=device)
    drafter = load_drafter(drafter_dir, TargetHandle.of(target), device=device)
    kind = kind_of(read_config(drafter_dir))
    k = block_size or (1 if kind == "mtp" else drafter.block_size)
    if kind != "mtp" and k > drafter.block_size:
        raise ValueError(f"block size {k} exceeds the drafter's block_size {drafter.block_size}")
    seqs, p, domains = continuations(target, data_dir, temperature, seed=seed)
    result = {"algorithm": kind, "block_size": k, "temperature": temperature, "domains": {}}
    total = RoundStats(k)
    for dom in sorted(set(domains)):
        rows = torch.tensor([i for i, d in enumerate(domains) if d == dom])
        st = evaluate_sequences(
            target, drafter, kind, seqs[rows].to(device), p, k, temperature, seed=seed
        )
        total.merge(st)
        result["domains"][dom] = _summary(st)
    result["domains"]["all"] = _summary(total)
    return result


def evaluate_contexts(
    target_dir,
    drafter_dir,
    data_dirs: list,
    temperatures: tuple[float, ...] = (0.0, 1.0),
    block_size: int | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> list[dict]:
    """`evaluate_drafter` per context bucket and temperature: each data folder holds prompts of
    one length (its bucket, e.g. 64, 512, 2048 tokens); every result gets `context` = that
    length. Ordered by context, then temperature."""
    from specserve.train.gendata import load_dataset

    lens = {str(d): int(load_dataset(d)["prompt_len"]) for d in data_dirs}
    return [
        evaluate_drafter(target_dir, drafter_dir, d, t, block_size, device, seed)
        | {"context": lens[str(d)]}
        for d in sorted(data_dirs, key=lambda d: lens[str(d)])
        for t in temperatures
    ]


def _summary(st: RoundStats) -> dict:
    return {
        "tau": round(st.tau, 3),
        "conditional": [round(x, 3) for x in st.conditional],
        "rounds": st.rounds,
    }


def engine_accept_length(
    target_dir, drafter_dir, algorithm: str, prompts: list[list[int]], k: int, max_tokens: int
) -> float:
    """The same measurement through the serving engine (greedy, every draft verified): a
    cross-check of the offline numbers. Returns the engine's average accept length."""
    from specserve.config import SpecConfig
    from specserve.core import SamplingParams
    from specserve.llm import LLM
    from specserve.speculative.factory import build_speculation

    llm = LLM(str(target_dir), max_total_tokens=8192)
    mtp = algorithm == "mtp"
    spec = SpecConfig(
        algorithm={"mtp": "NEXTN", "dflash": "DFLASH", "dspark": "DSPARK"}[algorithm],
        draft_model_path=str(drafter_dir),
        num_steps=k if mtp else None,
        block_size=None if mtp else k,
        verify_policy="full",
        adaptive_drafting=False,  # the drafter's own accept length: draft every step
    )
    llm.engine.set_speculation(*build_speculation(spec, llm.engine))
    llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return float(llm.engine.stats.avg_accept_length)
