"""Host memory and read throughput of the disk target-state cache, against data size.

    python benchmarks/target_cache.py [--target DIR] [--sizes 128 512 2048] [--seq-len 128]

Writes a bf16 cache (`specserve train cache-target`'s format) of random token rows for each
data size, then, in a fresh process per size and reader, reads random batches as a drafter
run does and reports sequences per second and how much the process's anonymous memory grew
from before the cache was opened to after the reads (RssAnon: memory the run owns; mapped file
pages are page cache the kernel can drop, reported as RssFile):

* `mmap`:  `TargetStateCache.batch` (memory-mapped shards);
* `ram`:   the same states loaded whole into host memory first (what an in-memory cache costs);
* `live`:  the target's forward over the same batches (no cache at all).

Without --target a random target is built (hidden 256, 4 layers); the live forward of a real
8B target is far slower than this one's, so the mmap/live ratio printed here is a floor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from specserve.models.loader import load_model
from specserve.train.drafter import default_layer_ids, target_states
from specserve.train.state_cache import CacheKey, TargetStateCache, write_cache


def memory_mb() -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}


@torch.no_grad()
def measure(target_dir: str, cache_dir: str, reader: str, batches: int, batch: int) -> dict:
    """One reader in this (fresh) process -> memory after reading and sequences/s."""
    torch.set_num_threads(1)
    target, _ = load_model(target_dir)
    key = TargetStateCache(cache_dir).key
    n, layers = key.num_seqs, key.target_layer_ids
    ids = torch.randint(3, target.config.vocab_size, (n, key.seq_len), generator=_gen())
    before = memory_mb()
    cache = TargetStateCache(cache_dir)
    if reader == "ram":
        everything = cache.read(torch.arange(n)).clone()
    gen = _gen()
    t0 = time.perf_counter()
    for _ in range(batches):
        idx = torch.randint(0, n, (batch,), generator=gen)
        if reader == "mmap":
            cache.batch(idx, "cpu")
        elif reader == "ram":
            everything[idx].float()
        else:
            target_states(target, ids[idx], layers)
    seconds = time.perf_counter() - t0
    after = memory_mb()
    return {
        "seqs_per_s": round(batches * batch / seconds, 1),
        "anon_growth_mb": round(after["RssAnon"] - before["RssAnon"], 1),
        "file_mb": round(after["RssFile"] - before["RssFile"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", help="a target folder (default: a random hidden-256 model)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--measure", nargs=2, metavar=("CACHE", "READER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.target, *args.measure, args.batches, args.batch)))
        return
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        target_dir = args.target or _random_target(Path(tmp) / "target")
        target, cfg = load_model(target_dir)
        layers = default_layer_ids(cfg.num_hidden_layers)
        print(f"target {target_dir}: hidden {cfg.hidden_size}, layers {list(layers)}")
        print(
            f"{'seqs':>6} {'cache MB':>9} {'reader':>6} {'seqs/s':>8} {'RssAnon +MB':>12}", end=""
        )
        print(f" {'RssFile +MB':>12}")
        for n in args.sizes:
            ids = torch.randint(3, cfg.vocab_size, (n, args.seq_len), generator=_gen())
            key = CacheKey.of(target_dir, ids, layers, cfg.hidden_size)
            cache = write_cache(target, key, ids, Path(tmp) / f"cache-{n}", chunk=32)
            size = sum(p.stat().st_size for p in cache.glob("*.bin")) / 2**20
            for reader in ("mmap", "ram", "live"):
                r = _child(args, target_dir, cache, reader)
                print(
                    f"{n:6d} {size:9.1f} {reader:>6} {r['seqs_per_s']:8.1f} "
                    f"{r['anon_growth_mb']:12.1f} {r['file_mb']:12.1f}"
                )


def _child(args, target_dir, cache: Path, reader: str) -> dict:
    cmd = [sys.executable, __file__, "--target", str(target_dir), "--measure", str(cache), reader]
    cmd += ["--batches", str(args.batches), "--batch", str(args.batch)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def _random_target(path: Path) -> str:
    from specserve.testing.tiny import make_checkpoint

    overrides = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, head_dim=32)
    overrides |= dict(num_attention_heads=8, num_key_value_heads=4)
    return str(make_checkpoint(path, seed=0, init_std=0.05, **overrides))


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


if __name__ == "__main__":
    main()
