"""PNG plots for `bench compare` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specserve.bench.compare import CompareConfig


def _grouped_bars(
    path: Path, title: str, ylabel: str, groups: list[str], series: dict[str, list[float]]
) -> Path:
    """One group of bars per workload, one bar per arm (missing values plotted as 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(groups) * max(1, len(series))), 3.6))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _per_position(path: Path, curves: dict[str, list[float]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, rates in curves.items():
        ax.plot(range(len(rates)), rates, marker="o", label=name)
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1.05)
    ax.set_title("Acceptance per draft position")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: list[dict], cfg: CompareConfig, out_dir: Path) -> list[Path]:
    """throughput.png, ttft.png, accept_length.png (if reported) and
    accept_per_position.png (if reported); returns the paths written."""
    if not results:
        return []
    arms = [a.name for a in cfg.arms]
    workloads = [w.name for w in cfg.workloads]
    index = {(r["arm"], r["workload"]): r for r in results}

    def series(key: str) -> dict[str, list[float]]:
        return {a: [float(index.get((a, w), {}).get(key) or 0.0) for w in workloads] for a in arms}

    paths = [
        _grouped_bars(
            out_dir / "throughput.png",
            "Output token throughput",
            "tok/s",
            workloads,
            series("output_throughput"),
        ),
        _grouped_bars(out_dir / "ttft.png", "Mean TTFT", "ms", workloads, series("mean_ttft_ms")),
    ]
    if any(r.get("accept_length") for r in results):
        paths.append(
            _grouped_bars(
                out_dir / "accept_length.png",
                "Accept length",
                "tokens per verify step",
                workloads,
                series("accept_length"),
            )
        )
    curves = {
        f"{r['arm']} / {r['workload']}": r["spec_accept_rate_per_pos"]
        for r in results
        if r.get("spec_accept_rate_per_pos")
    }
    if curves:
        paths.append(_per_position(out_dir / "accept_per_position.png", curves))
    return paths
