"""Speculative-decoding statistics the server reports about itself.

Two sources, whichever the server offers:
* vLLM-style Prometheus counters on `/metrics` (one prefix: `specserve:` if present, else
  `vllm:` or whichever appears first):
  `*spec_decode_num_drafts_total`, `*spec_decode_num_accepted_tokens_total`,
  `*spec_decode_num_draft_tokens_total` and, per draft position,
  `*spec_decode_num_accepted_tokens_per_pos_total{position="k"}`. Read before and after a
  run; from the deltas, accept length = 1 + accepted / drafts and the acceptance rate at
  position k = accepted_at_k / drafts.
* SGLang-style `/get_server_info`: `internal_states[0].avg_spec_accept_length`.
The counters are preferred because their deltas cover exactly the benchmarked requests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import httpx

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')

DRAFTS = "spec_decode_num_drafts_total"
ACCEPTED = "spec_decode_num_accepted_tokens_total"
DRAFT_TOKENS = "spec_decode_num_draft_tokens_total"
ACCEPTED_PER_POS = "spec_decode_num_accepted_tokens_per_pos_total"
PREFERRED_PREFIX = "specserve:"


@dataclass(frozen=True)
class SpecCounters:
    """Counter values summed over all label sets (engines, models) except `position`."""

    drafts: float = 0.0
    accepted: float = 0.0
    draft_tokens: float = 0.0
    accepted_per_pos: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SpecStats:
    accept_length: float | None
    accept_rate_per_pos: list[float]  # index k: fraction of drafts whose position k was accepted
    source: str  # "metrics", "server_info" or "none"


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) for every sample line of a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or line.startswith("#"):
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        samples.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))
    return samples


def spec_counters(text: str) -> SpecCounters | None:
    """The spec-decode counters in a `/metrics` page, or None if it has no drafts counter.
    Series of one prefix only: specserve exports them as `specserve:` and again as `vllm:`,
    and adding both would double every total. `specserve:` wins, else the first prefix seen."""
    found: dict[str, SpecCounters] = {}
    for prefix, (totals, per_pos) in _by_prefix(text).items():
        if DRAFTS in totals:
            found[prefix] = SpecCounters(
                totals[DRAFTS], totals.get(ACCEPTED, 0.0), totals.get(DRAFT_TOKENS, 0.0), per_pos
            )
    return found.get(PREFERRED_PREFIX) or next(iter(found.values()), None)


def _by_prefix(text: str) -> dict[str, tuple[dict[str, float], dict[int, float]]]:
    """prefix -> (totals by counter suffix, accepted per position), summed over label sets."""
    out: dict[str, tuple[dict[str, float], dict[int, float]]] = {}
    for name, labels, value in parse_prometheus(text):
        for suffix in (ACCEPTED_PER_POS, DRAFTS, ACCEPTED, DRAFT_TOKENS):
            if not name.endswith(suffix):
                continue
            totals, per_pos = out.setdefault(name[: -len(suffix)], ({}, {}))
            if suffix != ACCEPTED_PER_POS:
                totals[suffix] = totals.get(suffix, 0.0) + value
            elif labels.get("position", "").isdigit():
                pos = int(labels["position"])
                per_pos[pos] = per_pos.get(pos, 0.0) + value
            break
    return out


def stats_from_counters(before: SpecCounters, after: SpecCounters) -> SpecStats | None:
    drafts = after.drafts - before.drafts
    if drafts <= 0:
        return None
    accepted = after.accepted - before.accepted
    rates = [
        (after.accepted_per_pos[k] - before.accepted_per_pos.get(k, 0.0)) / drafts
        for k in sorted(after.accepted_per_pos)
    ]
    return SpecStats(1.0 + accepted / drafts, rates, "metrics")


def server_info_accept_length(info: dict | None) -> float | None:
    """`internal_states[0].avg_spec_accept_length` (or the first decode server's, as SGLang)."""
    if not isinstance(info, dict):
        return None
    if isinstance(info.get("decode"), list) and info["decode"]:
        info = info["decode"][0]
    states = info.get("internal_states")
    if isinstance(states, list) and states and isinstance(states[0], dict):
        value = states[0].get("avg_spec_accept_length")
        if isinstance(value, int | float) and value > 0:
            return float(value)
    return None


async def fetch_counters(http: httpx.AsyncClient, base_url: str) -> SpecCounters | None:
    try:
        r = await http.get(f"{base_url}/metrics")
    except httpx.HTTPError:
        return None
    return spec_counters(r.text) if r.status_code == 200 else None


async def fetch_server_info(http: httpx.AsyncClient, base_url: str) -> dict | None:
    try:
        r = await http.get(f"{base_url}/get_server_info")
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def combine(
    before: SpecCounters | None, after: SpecCounters | None, info: dict | None
) -> SpecStats:
    if before is not None and after is not None:
        stats = stats_from_counters(before, after)
        if stats is not None:
            return stats
    length = server_info_accept_length(info)
    if length is not None:
        return SpecStats(length, [], "server_info")
    return SpecStats(None, [], "none")
