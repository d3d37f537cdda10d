"""DeepSeek-V4 serving state: what one request keeps between forwards, and how it rolls back.

Per layer a request holds
* the sliding window's K (= V): the last `sliding_window - 1` committed tokens, plus the tokens
  of the latest forward until the next one starts (so rejected drafts can be dropped);
* per compressor (`compressor`, and `indexer` in CSA layers) the compressed entries emitted so
  far and the raw projected K/V and gate of the tokens from the last committed window boundary
  on (CSA: from one window earlier, whose first half-series the next entry overlaps with).

Every compressed entry is a pure function of the raw K/V and gate of its window (and, in CSA,
of the window before), so rolling back to any position only truncates: entries past the last
complete window and raw rows past the position are dropped, and the entries of a window
completed later are recomputed from the raw rows kept. The state is then exactly what plain
decoding would hold. Positions before a request's `num_tokens` are committed once the next
forward starts (`prepare`), which is when the window and raw rows are trimmed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CompressorState:
    """Compressed entries [E, d] of windows 0..E-1, and raw rows of positions raw_start.."""

    ratio: int
    overlap: bool  # CSA: an entry also reads the first half-series of the previous window
    entries: torch.Tensor | None = None
    raw_kv: torch.Tensor | None = None
    raw_gate: torch.Tensor | None = None
    raw_start: int = 0

    @property
    def num_entries(self) -> int:
        return 0 if self.entries is None else self.entries.shape[0]

    def append_raw(self, kv: torch.Tensor, gate: torch.Tensor) -> None:
        if self.raw_kv is None:
            self.raw_kv, self.raw_gate = kv, gate
        else:
            self.raw_kv = torch.cat([self.raw_kv, kv])
            self.raw_gate = torch.cat([self.raw_gate, gate])

    def raw_end(self) -> int:
        return self.raw_start + (0 if self.raw_kv is None else self.raw_kv.shape[0])

    def rollback(self, num_tokens: int) -> None:
        keep = num_tokens // self.ratio
        if self.entries is not None and self.entries.shape[0] > keep:
            self.entries = self.entries[:keep]
        if self.raw_kv is not None and self.raw_end() > num_tokens:
            n = max(0, num_tokens - self.raw_start)
            self.raw_kv, self.raw_gate = self.raw_kv[:n], self.raw_gate[:n]

    def trim(self) -> None:
        """Drop raw rows no entry still to come can read."""
        start = max(0, (self.num_entries - int(self.overlap)) * self.ratio)
        if self.raw_kv is not None and start > self.raw_start:
            cut = start - self.raw_start
            self.raw_kv, self.raw_gate = self.raw_kv[cut:], self.raw_gate[cut:]
            self.raw_start = start

    def nbytes(self) -> int:
        ts = (self.entries, self.raw_kv, self.raw_gate)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class LayerState:
    window: torch.Tensor | None = None  # [w, d] K=V of positions window_start..
    window_start: int = 0
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None

    def compressors(self) -> list[CompressorState]:
        return [c for c in (self.compressor, self.indexer) if c is not None]


@dataclass
class SequenceState:
    """One request's state over all layers; `num_tokens` positions are in it."""

    layers: list[LayerState]
    sliding_window: int
    num_tokens: int = 0
    pending: int = field(default=0, repr=False)  # tokens of the forward being run

    @classmethod
    def new(cls, rates: list[int], csa: list[bool], sliding_window: int) -> SequenceState:
        layers = []
        for rate, is_csa in zip(rates, csa, strict=True):
            layer = LayerState()
            if rate:
                layer.compressor = CompressorState(rate, is_csa)
                layer.indexer = CompressorState(rate, True) if is_csa else None
            layers.append(layer)
        return cls(layers, sliding_window)

    def prepare(self, start: int, num_new: int) -> None:
        """Before a forward of `num_new` tokens at position `start`: drop what lies past `start`
        (rejected drafts), then trim what the committed prefix no longer needs."""
        if start > self.num_tokens:
            raise ValueError(f"forward starts at {start}, state holds {self.num_tokens} tokens")
        keep_window = self.sliding_window - 1
        for layer in self.layers:
            if layer.window is not None:
                end = max(0, start - layer.window_start)
                first = max(0, end - keep_window)
                layer.window = layer.window[first:end]
                layer.window_start += first
            for comp in layer.compressors():
                comp.rollback(start)
                comp.trim()
        self.num_tokens, self.pending = start, num_new

    def finish_forward(self) -> None:
        self.num_tokens += self.pending
        self.pending = 0

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            if layer.window is not None:
                total += layer.window.numel() * layer.window.element_size()
            total += sum(c.nbytes() for c in layer.compressors())
        return total
