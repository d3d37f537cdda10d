"""Steps-per-second (SPS) table: how many target verify passes per second at B batch tokens.

Profiled once at engine start-up and read by the hardware-aware prefix scheduler
(`planner.plan_scheduler`), which trades expected accepted tokens against this cost curve.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SPSTable:
    """Measured points (B, steps/s), linearly interpolated, flat beyond both ends.

    batch_tokens: strictly ascending positive verify batch sizes B (tokens in one target forward).
    steps_per_second: positive finite steps/s measured at each B.
    """

    batch_tokens: tuple[int, ...]
    steps_per_second: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_tokens", tuple(int(b) for b in self.batch_tokens))
        object.__setattr__(self, "steps_per_second", tuple(float(s) for s in self.steps_per_second))
        b, s = self.batch_tokens, self.steps_per_second
        if not b or len(b) != len(s):
            raise ValueError(
                f"SPS table needs the same non-zero number of batch_tokens and steps_per_second, "
                f"got {len(b)} and {len(s)}"
            )
        if b[0] < 1 or any(x >= y for x, y in zip(b, b[1:], strict=False)):
            raise ValueError(f"batch_tokens must be positive and strictly ascending, got {b}")
        if not all(math.isfinite(x) and x > 0 for x in s):
            raise ValueError(f"steps_per_second must be positive and finite, got {s}")

    def __call__(self, b: int) -> float:
        """Steps per second at b batch tokens."""
        xs, ys = self.batch_tokens, self.steps_per_second
        if b <= xs[0]:
            return ys[0]
        for i in range(1, len(xs)):
            if b <= xs[i]:
                frac = (b - xs[i - 1]) / (xs[i] - xs[i - 1])
                return ys[i - 1] + frac * (ys[i] - ys[i - 1])
        return ys[-1]

    def save(self, path: str | Path) -> None:
        """Write JSON {"batch_tokens": [...], "steps_per_second": [...]}."""
        data = {
            "batch_tokens": list(self.batch_tokens),
            "steps_per_second": list(self.steps_per_second),
        }
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SPSTable:
        """Read a table written by `save`; ValueError naming the file if it is not one."""
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"SPS table {path}: not valid JSON ({e})") from e
        if not isinstance(data, dict) or not {"batch_tokens", "steps_per_second"} <= data.keys():
            raise ValueError(f"SPS table {path}: need keys 'batch_tokens' and 'steps_per_second'")
        b, s = data["batch_tokens"], data["steps_per_second"]
        if not isinstance(b, list) or not all(type(x) is int for x in b):
            raise ValueError(f"SPS table {path}: 'batch_tokens' must be a list of integers")
        if not isinstance(s, list) or not all(type(x) in (int, float) for x in s):
            raise ValueError(f"SPS table {path}: 'steps_per_second' must be a list of numbers")
        try:
            return cls(tuple(b), tuple(s))
        except ValueError as e:
            raise ValueError(f"SPS table {path}: {e}") from e


def profile_sps(
    step_fn: Callable[[int], None],
    batch_tokens: Sequence[int],
    repeats: int = 3,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    retries: int = 3,
) -> SPSTable:
    """Time step_fn(B) (one target forward over B tokens) for each B.

    steps/s = 1 / the fastest of `repeats` runs: other load on the machine only ever slows a
    run down, so the minimum is the estimate least disturbed by it (a single slow outlier at
    B = 1 would otherwise make every verify token look unaffordable). A size whose fastest run
    is still over twice as slow as some larger size caught a busy moment on every run (on a
    shared host, a spell of contention can outlast `repeats` runs): it is timed again, up to
    `retries` more rounds. Times are then made non-decreasing in B, since a larger forward
    cannot be cheaper; without the retries one such spell at B = 2 once flattened a whole
    table to its time, and the scheduler then verified no draft token at all.

    step_fn must block until its work is done (call torch.cuda.synchronize() on a GPU).
    batch_tokens may be in any order and contain duplicates; the table is sorted and unique.
    clock returns seconds (injectable for tests).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    sizes = sorted(set(int(b) for b in batch_tokens))

    def fastest(b: int) -> float:
        times = []
        for _ in range(repeats):
            start = clock()
            step_fn(b)
            times.append(clock() - start)
        return min(times)

    best = {}
    for b in sizes:
        for _ in range(warmup):
            step_fn(b)
        best[b] = fastest(b)
    for i, b in enumerate(sizes):
        for _ in range(retries):
            if best[b] <= 2 * min((best[c] for c in sizes[i + 1 :]), default=best[b]):
                break
            best[b] = min(best[b], fastest(b))
    rates, slowest = [], 1e-9
    for b in sizes:
        slowest = max(slowest, best[b])
        rates.append(1.0 / slowest)
    return SPSTable(tuple(sizes), tuple(rates))
