"""Start-up time of `specserve serve` (demo target + DSPARK drafter), split into its phases.

    .venv/bin/python benchmarks/serve_startup.py [--model-path models/demo/target] \
        [--draft-model-path models/demo/dspark] [--runs 2]

Starts the server `--runs` times with an empty SPS cache for the first run only (a temporary
XDG_CACHE_HOME), on 127.0.0.1, and prints per run: seconds until /health answers, and the
phases the server logs (target load, speculation set-up, of which SPS profiling). The first run
profiles the SPS table; later runs load it from the cache.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from specserve.bench.compare import free_port

PHASES = {
    "target load": r"target loaded in ([\d.]+) s",
    "speculation set-up": r"speculation ready in ([\d.]+) s",
    "  of which SPS profiling": r"SPS table profiled at \d+ batch sizes in ([\d.]+) s",
}


def start_once(argv: list[str], env: dict[str, str], url: str) -> tuple[float, str]:
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"server exited with {proc.returncode}: {log.read()[-2000:]}")
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            ready = time.monotonic() - t0
        finally:
            proc.terminate()
            proc.wait(60)
        log.seek(0)
        return ready, log.read()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default="models/demo/target")
    p.add_argument("--draft-model-path", default="models/demo/dspark")
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    env = {**os.environ, "XDG_CACHE_HOME": tempfile.mkdtemp(prefix="sps-cache-")}
    for run in range(args.runs):
        port = free_port()
        argv = [sys.executable, "-m", "specserve", "serve", "--model-path", args.model_path]
        argv += ["--speculative-algorithm", "DSPARK"]
        argv += ["--speculative-draft-model-path", args.draft_model_path]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "info"]
        sts = Path(args.draft_model_path) / "sts.json"
        if sts.is_file():
            argv += ["--speculative-dspark-confidence-sts-path", str(sts)]
        ready, log = start_once(argv, env, f"http://127.0.0.1:{port}")
        cache = "cold SPS cache" if run == 0 else "warm SPS cache"
        print(f"run {run + 1} ({cache}): /health after {ready:.1f} s")
        for name, pattern in PHASES.items():
            m = re.search(pattern, log)
            print(f"  {name}: {m.group(1) + ' s' if m else 'not run'}")


if __name__ == "__main__":
    main()
