"""Soak test of `specserve serve`: many clients, mixed requests, some that disconnect.

    .venv/bin/python benchmarks/soak.py [--model-path models/demo/target] [--clients 256] \
        [--requests 2000] [--disconnect-rate 0.1] [-- --speculative-algorithm DSPARK ...]

Starts the server on 127.0.0.1 (a free port; nothing else is contacted), sends the requests
(completions and chat, streamed or not, greedy or sampled, n 1-2, logprobs, stop strings, and
some invalid bodies that must get a 400) from `--clients` concurrent clients, lets a fraction
of them disconnect mid-request, then checks that the server is idle with its KV cache back to
the baseline, stops it with SIGTERM and counts the tracebacks in its log. Every request and the
whole run are bounded by timeouts. Prints one summary; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from specserve.bench.compare import ServerProcess, free_port

INVALID = [
    {"prompt": "x", "seed": 2**64},
    {"prompt": "x", "top_k": 2**63},
    {"prompt": [[False]]},
    {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "repetition_penalty": 0},
]


def make_request(rng: random.Random, max_tokens: int) -> tuple[str, dict, bool]:
    """(route, body, expect_400)."""
    if rng.random() < 0.05:
        return "/v1/completions", dict(rng.choice(INVALID)), True
    body: dict = {
        "max_tokens": rng.randint(1, max_tokens),
        "temperature": rng.choice([0.0, 0.7, 1.0]),
        "stream": rng.random() < 0.6,
        "n": 1 if rng.random() < 0.85 else 2,
        "seed": rng.randrange(2**64) if rng.random() < 0.3 else None,
    }
    if rng.random() < 0.1:
        body["logprobs"] = 2
    if rng.random() < 0.1:
        body["stop"] = ["\n\n"]
    text = rng.choice(["def parse(", "The manual says", "import os\n", "In this section"]) * (
        rng.randint(1, 8)
    )
    if rng.random() < 0.5:
        if body.pop("logprobs", None):
            body.update(logprobs=True, top_logprobs=2)
        return (
            "/v1/chat/completions",
            {**body, "messages": [{"role": "user", "content": text}]},
            False,
        )
    return "/v1/completions", {**body, "prompt": text}, False


async def one(
    http: httpx.AsyncClient, route: str, body: dict, disconnect: bool, rng: random.Random
) -> tuple[str, float]:
    """An outcome label and the latency."""
    t0 = time.monotonic()
    try:
        if body.get("stream"):
            async with http.stream("POST", route, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return _status(r), time.monotonic() - t0
                cut = rng.randint(1, 4) if disconnect else None
                async for i, line in _enumerate(r.aiter_lines()):
                    if line.startswith("data: {") and "error" in json.loads(line[6:]):
                        return f"stream error event: {line[6:200]}", time.monotonic() - t0
                    if cut is not None and i >= cut:
                        return "disconnected", time.monotonic() - t0
            return "HTTP 200", time.monotonic() - t0
        timeout = rng.uniform(0.05, 1.0) if disconnect else None
        r = await asyncio.wait_for(http.post(route, json=body), timeout)
        return _status(r), time.monotonic() - t0
    except TimeoutError:
        return "disconnected", time.monotonic() - t0
    except httpx.HTTPError as e:
        return f"client error {type(e).__name__}", time.monotonic() - t0


def _status(r: httpx.Response) -> str:
    """ "HTTP 200", or for an unexpected failure the status with its message."""
    if r.status_code in (200, 400):
        return f"HTTP {r.status_code}"
    return f"HTTP {r.status_code}: {r.text[:200]}"


async def _enumerate(it):
    i = 0
    async for x in it:
        yield i, x
        i += 1


async def run_load(url: str, args: argparse.Namespace) -> tuple[Counter, list[float], int]:
    rng = random.Random(args.seed)
    plan = []
    for _ in range(args.requests):
        route, body, expect_400 = make_request(rng, args.max_tokens)
        disconnect = not expect_400 and rng.random() < args.disconnect_rate
        plan.append((route, body, expect_400, disconnect))
    outcomes: Counter = Counter()
    latencies: list[float] = []
    wrong_400 = 0
    sem = asyncio.Semaphore(args.clients)
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as http:

        async def task(i: int) -> None:
            nonlocal wrong_400
            route, body, expect_400, disconnect = plan[i]
            async with sem:
                label, dt = await one(http, route, body, disconnect, random.Random(i))
            outcomes[label] += 1
            latencies.append(dt)
            wrong_400 += expect_400 != (label == "HTTP 400")

        await asyncio.gather(*(task(i) for i in range(len(plan))))
    return outcomes, latencies, wrong_400


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"specserve:{name}{{") or line.startswith(f"specserve:{name} "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def wait_idle(url: str, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics", timeout=5).text
        state = {
            k: metric(text, k)
            for k in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
        }
        if not state["num_requests_running"] and not state["num_requests_waiting"]:
            return state
        if time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default="models/demo/target")
    p.add_argument("--clients", type=int, default=256)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--disconnect-rate", type=float, default=0.1)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--run-timeout", type=float, default=3600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("serve_args", nargs="*", help="extra `specserve serve` flags, after --")
    args = p.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
    argv = [sys.executable, "-m", "specserve", "serve", "--model-path", args.model_path]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--max-queued-requests", "100000"]
    server = ServerProcess([*argv, *args.serve_args], log, url)
    server.start()
    try:
        server.wait_healthy(600)
        baseline = wait_idle(url, 5)["kv_cache_usage_perc"]
        t0 = time.monotonic()
        outcomes, lat, wrong_400 = asyncio.run(
            asyncio.wait_for(run_load(url, args), args.run_timeout)
        )
        duration = time.monotonic() - t0
        idle = wait_idle(url, 60)
        healthy = httpx.get(url + "/health", timeout=5).status_code == 200
    finally:
        t_stop = time.monotonic()
        server.stop(timeout=60)
        stop_s = time.monotonic() - t_stop
    text = log.read_text(errors="replace")
    tracebacks = text.count("Traceback")
    five_xx = sum(n for k, n in outcomes.items() if k.startswith("HTTP 5"))
    lat.sort()
    print(f"requests {args.requests}, clients {args.clients}, duration {duration:.1f} s")
    print("outcomes: " + ", ".join(f"{k} {n}" for k, n in sorted(outcomes.items())))
    print(f"latency median {statistics.median(lat):.2f} s, p99 {lat[int(0.99 * len(lat))]:.2f} s")
    print(f"invalid bodies not answered 400 (or valid ones answered 400): {wrong_400}")
    print(f"after the run: {idle}, KV baseline {baseline}; /health ok: {healthy}")
    print(f"SIGTERM to exit: {stop_s:.1f} s; tracebacks in the server log: {tracebacks} ({log})")
    failed = sum(n for k, n in outcomes.items() if k.startswith(("client error", "stream error")))
    ok = (
        not five_xx
        and not failed
        and not wrong_400
        and healthy
        and not tracebacks
        and idle["kv_cache_usage_perc"] <= baseline
        and not idle["num_requests_running"]
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
