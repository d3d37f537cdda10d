"""The frozen target's states of a drafter data set, written once to disk and memory-mapped.

A drafter step needs, for each training sequence, the hidden states of `target_layer_ids`
(the drafter's context) and the target's last hidden state (its distributions, through the LM
head). The target is frozen, so they are computed once (`write_cache`, each rank of a torchrun
job writing its own share of the sequences) and every rank of every later run reads them
(`TargetStateCache`); reading maps the files, so host memory does not grow with the data.

Layout of a cache folder:

    index.json                   version, dtype, the `CacheKey` and the shard list
    shard-00000-of-00002.bin     rows [start, start + count) of the data set, each row
    shard-00001-of-00002.bin     [seq_len, (len(target_layer_ids) + 1) * hidden] in `dtype`:
                                 the captured layers, then the last hidden state

`CacheKey` records what the states were built from: digests of the target's config and
weights (the weights are sampled: every file's size and its first and last MiB) and of the
token ids, and the shapes. A run whose target, data or layers differ is refused by field name.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from specserve.train.loop import Progress
from specserve.train.parallel import World, barrier

CACHE_VERSION = 1
INDEX_NAME = "index.json"
# dtype name -> (torch dtype of the values, numpy dtype of their bytes in the files)
CACHE_DTYPES = {
    "bfloat16": (torch.bfloat16, np.int16),
    "float16": (torch.float16, np.float16),
    "float32": (torch.float32, np.float32),
}
SAMPLE_BYTES = 1 << 20


@dataclass(frozen=True)
class CacheKey:
    """What a cache was built from; a run must match it field by field (shapes first)."""

    num_seqs: int
    seq_len: int
    hidden_size: int
    target_layer_ids: tuple[int, ...]
    target_config: str
    target_weights: str
    data: str

    @classmethod
    def of(cls, target_dir: str | Path, ids: torch.Tensor, layer_ids, hidden: int) -> CacheKey:
        target_dir = Path(target_dir)
        weights = hashlib.sha256()
        for path in sorted(target_dir.glob("*.safetensors")):
            size = path.stat().st_size
            weights.update(f"{path.name}:{size}".encode())
            with path.open("rb") as f:
                weights.update(f.read(SAMPLE_BYTES))
                f.seek(max(0, size - SAMPLE_BYTES))
                weights.update(f.read(SAMPLE_BYTES))
        return cls(
            target_config=_sha256((target_dir / "config.json").read_bytes()),
            target_weights=weights.hexdigest(),
            data=_sha256(ids.to(torch.int32).contiguous().numpy().tobytes()),
            num_seqs=int(ids.shape[0]),
            seq_len=int(ids.shape[1]),
            hidden_size=int(hidden),
            target_layer_ids=tuple(int(i) for i in layer_ids),
        )


def write_cache(
    target,
    key: CacheKey,
    ids: torch.Tensor,
    out: str | Path,
    world: World = World(),
    dtype: str = "bfloat16",
    chunk: int = 16,
    lengths: torch.Tensor | None = None,
) -> Path:
    """Run the target over this rank's share of `ids` [N, T] and write its shard; rank 0 writes
    the index once every shard is on disk. -> the cache folder. `lengths` [N]: rows are
    right-padded to T; the target runs only up to each chunk's longest row (zeros after)."""
    from specserve.train.drafter import target_states

    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}")
    out = Path(out)
    if (out / INDEX_NAME).exists():
        raise FileExistsError(f"{out}: a target cache is already there; use another folder")
    out.mkdir(parents=True, exist_ok=True)
    device = next(target.parameters()).device
    rows = world.slice(len(ids))
    path = out / _shard_name(world.rank, world.size)
    starts = range(rows.start, rows.stop, chunk)
    bar = Progress(len(starts), 0, "cache-target") if world.main else None
    with open(f"{path}.tmp", "wb") as f:
        for i in starts:
            j = min(i + chunk, rows.stop)
            t = ids.shape[1] if lengths is None else int(lengths[i:j].max())
            feats, last = target_states(target, ids[i:j, :t].to(device), key.target_layer_ids)
            rec = torch.cat([feats, last], -1).to("cpu", CACHE_DTYPES[dtype][0])
            rec = F.pad(rec, (0, 0, 0, ids.shape[1] - t)).contiguous()
            raw = rec.view(torch.int16) if dtype == "bfloat16" else rec  # numpy has no bf16
            f.write(raw.numpy().tobytes())
            if bar is not None:
                bar.update((j - i) * t)
    if bar is not None:
        bar.close()
    os.replace(f"{path}.tmp", path)
    barrier()
    if world.main:
        shards = [
            {"file": _shard_name(r, world.size), "start": s.start, "count": len(s)}
            for r in range(world.size)
            for s in [World(r, world.size).slice(len(ids))]
        ]
        index = {"version": CACHE_VERSION, "dtype": dtype, "key": asdict(key), "shards": shards}
        tmp = out / f"{INDEX_NAME}.tmp"
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, out / INDEX_NAME)
    barrier()
    return out


class TargetStateCache:
    """A written cache, memory-mapped read-only. `batch(idx)` -> (captured [B, T, n*H],
    last hidden [B, T, H]) in float32, exactly what `target_states` gave rounded to `dtype`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index_file = self.path / INDEX_NAME
        if not index_file.is_file():
            raise FileNotFoundError(
                f"{self.path}: no target cache (no {INDEX_NAME}); "
                "write one with `specserve train cache-target`"
            )
        index = json.loads(index_file.read_text())
        if index.get("version") != CACHE_VERSION:
            raise ValueError(f"{self.path}: cache version {index.get('version')} is not supported")
        key = index["key"] | {"target_layer_ids": tuple(index["key"]["target_layer_ids"])}
        self.key = CacheKey(**key)
        self.dtype = index["dtype"]
        self.torch_dtype, self.np_dtype = CACHE_DTYPES[self.dtype]
        self.width = (len(self.key.target_layer_ids) + 1) * self.key.hidden_size
        self.starts = np.array([s["start"] for s in index["shards"]])
        self.shards = [self._map(s) for s in index["shards"]]

    def _map(self, shard: dict) -> np.ndarray | None:
        path = self.path / shard["file"]
        shape = (shard["count"], self.key.seq_len, self.width)
        expected = int(np.prod(shape)) * np.dtype(self.np_dtype).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise ValueError(f"{path}: missing or not {expected} bytes; rebuild the cache")
        if not shard["count"]:
            return None
        with path.open("rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        mapped.madvise(mmap.MADV_RANDOM)  # rows are read in random order: no read-ahead
        return np.ndarray(shape, self.np_dtype, buffer=mapped)

    def check(self, expected: CacheKey, ignore: tuple[str, ...] = ()) -> None:
        """Refuse a cache built from another target, data set or layer choice, naming the field."""
        for f in fields(CacheKey):
            have, want = getattr(self.key, f.name), getattr(expected, f.name)
            if f.name not in ignore and have != want:
                raise ValueError(
                    f"target cache {self.path} does not fit this run: {f.name} is {_short(have)} "
                    f"in the cache, {_short(want)} here; write a new one with "
                    "`specserve train cache-target`"
                )

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` as stored: [len(idx), T, width] in the cache's dtype."""
        idx = idx.cpu().numpy()
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty((len(idx), self.key.seq_len, self.width), dtype=self.np_dtype)
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            out[rows] = self.shards[s][idx[rows] - self.starts[s]]
        return torch.from_numpy(out).view(self.torch_dtype)

    def batch(self, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.read(idx).to(device, torch.float32)
        split = self.width - self.key.hidden_size
        return rec[..., :split], rec[..., split:]


def _shard_name(rank: int, size: int) -> str:
    return f"shard-{rank:05d}-of-{size:05d}.bin"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _short(value) -> str:
    if isinstance(value, tuple):
        return str(list(value))
    return f"{value[:12]}..." if isinstance(value, str) and len(value) > 16 else str(value)
