"""report.md for `bench compare`: one Metric | arm ... | Gain table per workload."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specserve.bench.compare import CompareConfig

# (label, result field, direction): +1 higher is better, -1 lower is better, 0 no gain.
ROWS: tuple[tuple[str, str, int], ...] = (
    ("Successful requests", "completed", 0),
    ("Failed requests", "failed", 0),
    ("Request throughput (req/s)", "request_throughput", +1),
    ("Input token throughput (tok/s)", "input_throughput", +1),
    ("Output token throughput (tok/s)", "output_throughput", +1),
    ("Total token throughput (tok/s)", "total_throughput", +1),
    ("Concurrency", "concurrency", 0),
    ("Accept length", "accept_length", +1),
    ("Mean E2E Latency (ms)", "mean_e2e_latency_ms", -1),
    ("Median E2E Latency (ms)", "median_e2e_latency_ms", -1),
    ("P99 E2E Latency (ms)", "p99_e2e_latency_ms", -1),
    ("Mean TTFT (ms)", "mean_ttft_ms", -1),
    ("Median TTFT (ms)", "median_ttft_ms", -1),
    ("P99 TTFT (ms)", "p99_ttft_ms", -1),
    ("Mean TPOT (ms)", "mean_tpot_ms", -1),
    ("Median TPOT (ms)", "median_tpot_ms", -1),
    ("P99 TPOT (ms)", "p99_tpot_ms", -1),
    ("Mean ITL (ms)", "mean_itl_ms", -1),
    ("Median ITL (ms)", "median_itl_ms", -1),
    ("P99 ITL (ms)", "p99_itl_ms", -1),
)


def gain(base: float | None, cand: float | None, direction: int) -> float | None:
    """Candidate over baseline as a 'times better' ratio: >1 means the candidate is better."""
    if direction == 0 or base is None or cand is None or base <= 0 or cand <= 0:
        return None
    return cand / base if direction > 0 else base / cand


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def workload_table(arms: list[str], by_arm: dict[str, dict], pair: tuple[str, str] | None) -> str:
    """Markdown table for one workload; `by_arm` maps arm name -> result (missing: failed)."""
    head = ["Metric", *arms] + ([f"Gain ({pair[1]} vs {pair[0]})"] if pair else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, direction in ROWS:
        values = [by_arm.get(a, {}).get(key) for a in arms]
        if key == "accept_length" and all(v is None for v in values):
            continue
        cells = [label, *(_cell(v) for v in values)]
        if pair:
            g = gain(by_arm.get(pair[0], {}).get(key), by_arm.get(pair[1], {}).get(key), direction)
            cells.append("—" if g is None else f"{g:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def greedy_matches(
    arms: list[str], by_arm: dict[str, dict], options: dict
) -> dict[str, tuple[int, int, bool]]:
    """For a greedy workload whose results carry their texts (`output_details`): each other
    arm's outputs against the first arm's, request by request -> arm: (requests with the same
    text, the first arm's requests, every text the same). Empty where there is nothing to
    compare (sampled, or the first arm kept no texts). A lossless speculative arm matches plain
    decoding exactly."""
    if float(options.get("temperature", 0.0)) != 0.0:
        return {}
    texts = {a: by_arm[a].get("generated_texts") for a in arms if a in by_arm}
    ref = texts.get(arms[0])
    if ref is None:
        return {}
    out = {}
    for arm in arms[1:]:
        other = texts.get(arm)
        if other is not None:
            same = sum(x == y for x, y in zip(ref, other, strict=False))
            out[arm] = (same, len(ref), same == len(ref) == len(other))
    return out


def identity_line(arms: list[str], by_arm: dict[str, dict], options: dict) -> str | None:
    """`greedy_matches` in words for the report (None where there is nothing to compare)."""
    matches = greedy_matches(arms, by_arm, options)
    if not matches:
        return None
    parts = [
        f"{arm} {same}/{total} {'identical' if ok else '**DIFFERENT**'}"
        for arm, (same, total, ok) in matches.items()
    ]
    return f"Greedy outputs against {arms[0]}, request by request: " + "; ".join(parts) + "."


def _workload_line(options: dict) -> str:
    """The workload as bench serve flags (true booleans as bare flags, false ones left out)."""
    parts = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif value is not False:
            parts.append(f"{flag} {value}")
    return " ".join(parts) or "(defaults)"


def write_report(
    cfg: CompareConfig,
    results: list[dict],
    failures: list[str],
    images: list[Path],
    path: Path,
    config_path: str | Path,
) -> None:
    arms = [a.name for a in cfg.arms]
    pair = cfg.gain_pair()
    out = [
        "# specserve bench compare",
        "",
        f"Config `{config_path}`, written {datetime.now().isoformat(timespec='seconds')}.",
        "",
    ]
    if cfg.notes:
        out += ["## Notes", "", cfg.notes.strip(), ""]
    out += ["## Arms", ""]
    out += [f"* **{a.name}**: `{a.describe()}`" for a in cfg.arms]
    if pair:
        out += [
            "",
            f"Gain = {pair[1]} vs {pair[0]} as a ratio where >1 is better: candidate/baseline "
            "for throughput and accept length, baseline/candidate for latencies.",
        ]
    for wl in cfg.workloads:
        by_arm = {r["arm"]: r for r in results if r.get("workload") == wl.name}
        out += ["", f"## Workload `{wl.name}`", "", f"`bench serve {_workload_line(wl.options)}`"]
        out += ["", workload_table(arms, by_arm, pair)]
        same = identity_line(arms, by_arm, wl.options)
        if same:
            out += ["", same]
        per_pos = {a: by_arm[a]["spec_accept_rate_per_pos"] for a in arms if a in by_arm}
        per_pos = {a: v for a, v in per_pos.items() if v}
        if per_pos:
            out += ["", "Acceptance rate per draft position:", ""]
            out += [f"* {a}: " + " ".join(f"{r:.3f}" for r in v) for a, v in per_pos.items()]
    if images:
        out += ["", "## Plots", ""]
        out += [f"![{p.stem}]({p.name})" for p in images]
    if failures:
        out += ["", "## Failures", ""] + [f"* {f}" for f in failures]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
