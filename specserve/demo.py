"""`make demo`: the seed's comparison on the bundled demo model, scaled to a laptop CPU.

With `models/demo/` present, it runs `bench compare` with three arms (NONE, NEXTN = the seed's
MTP baseline, DSPARK) and two workloads (the seed's A: 1K in / 1K out, one stream; B: 64K in /
3K out, 10 users; both scaled down as `write_workloads` says) and prints the report. Without the
bundle it serves a small random model and sends a few requests, so the command always shows
something real.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

from specserve.bench.datasets import domains_in_turn

BUNDLE = Path(__file__).resolve().parent.parent / "models" / "demo"

PROMPTS = "prompts_heldout.jsonl"  # held-out code and prose the bundle never trained on


def write_workloads(bundle: Path, out: Path) -> list[dict]:
    """The seed's two workloads, scaled to a 2-core CPU, on held-out text of the bundle:
    A (seed: 1K in / 1K out, one stream) -> one 64-token prompt, 256 out, one stream;
    B (seed: 64K in / 3K out, 10 users) -> 16 prompts joined to 1024 tokens, 192 out, 10 users.
    """
    rows = [json.loads(line) for line in (bundle / PROMPTS).read_text().splitlines() if line]
    ids = [r["token_ids"] for r in rows]
    single = domains_in_turn(bundle / PROMPTS)[:6]
    joined = [sum((ids[(16 * i + j) % len(ids)] for j in range(16)), []) for i in range(10)]
    a, b = out / "workload_a.jsonl", out / "workload_b.jsonl"
    a.write_text("".join(json.dumps({"prompt": p, "output_len": 256}) + "\n" for p in single))
    b.write_text("".join(json.dumps({"prompt": p, "output_len": 192}) + "\n" for p in joined))
    common = {"dataset_name": "jsonl", "ignore_eos": True, "temperature": 0.0}
    return [
        {
            "name": "A: 64 in / 256 out, 1 stream (seed: 1K/1K x1)",
            "dataset_path": str(a),
            "num_prompts": len(single),
            "max_concurrency": 1,
            **common,
        },
        {
            "name": "B: 1024 in / 192 out, 10 users (seed: 64K/3K x10)",
            "dataset_path": str(b),
            "num_prompts": len(joined),
            "max_concurrency": 10,
            **common,
        },
    ]


def compare_config(bundle: Path, workloads: list[dict]) -> dict:
    target = str(bundle / "target")
    common = f"--model-path {target} --served-model-name demo --max-total-tokens 32768"
    arms = [{"name": "NONE", "serve": common}]
    if (bundle / "mtp").is_dir():
        arms.append(
            {
                "name": "NEXTN (MTP)",
                "serve": f"{common} --speculative-algorithm NEXTN "
                f"--speculative-draft-model-path {bundle / 'mtp'} "
                "--speculative-num-steps 3",
            }
        )
    if (bundle / "dspark").is_dir():
        sts = bundle / "dspark" / "sts.json"
        extra = f" --speculative-dspark-confidence-sts-path {sts}" if sts.is_file() else ""
        arms.append(
            {
                "name": "DSPARK",
                "serve": f"{common} --speculative-algorithm DSPARK "
                f"--speculative-draft-model-path {bundle / 'dspark'}{extra}",
            }
        )
    return {
        "notes": "The seed's workloads scaled to a 2-core CPU and the demo model, on held-out "
        "code and prose the bundle never trained on: A 1K/1K x1 -> 64/256 x1; B 64K/3K x10 -> "
        "1024/192 x10. Greedy, ignore_eos. Gain = last arm vs the baseline arm (the seed's "
        "MTP).",
        "baseline": arms[1]["name"] if len(arms) > 2 else arms[0]["name"],
        "arms": arms,
        "workloads": workloads,
    }


def run_bundle(out: Path) -> int:
    from specserve.bench.compare import run_compare

    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "compare.yaml"
    config = compare_config(BUNDLE, write_workloads(BUNDLE, out))
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"bench compare --config {cfg_path} --out {out}", flush=True)
    code = run_compare(cfg_path, out)
    report = out / "report.md"
    if report.is_file():
        print("\n" + report.read_text())
    return code


def run_fallback() -> int:
    """No bundle yet: serve a small random model and show a few requests end to end."""
    import socket
    import subprocess

    import httpx

    from specserve.models.tiny import make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "tiny-random")
        print(f"no demo bundle in {BUNDLE}; serving a random tiny model from {path}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "specserve",
            "serve",
            "--model-path",
            str(path),
            "--port",
            str(port),
            "--max-total-tokens",
            "8192",
            "--log-level",
            "warning",
        ]
        proc = subprocess.Popen(cmd)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
                deadline = time.time() + 120
                while True:
                    try:
                        if c.get("/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if proc.poll() is not None or time.time() > deadline:
                        print("the server did not start", file=sys.stderr)
                        return 1
                    time.sleep(0.2)
                t = time.perf_counter()
                r = c.post(
                    "/v1/completions",
                    json={
                        "prompt": "def fib(n):",
                        "max_tokens": 32,
                        "temperature": 0,
                        "ignore_eos": True,
                    },
                )
                print(
                    "completion:",
                    json.dumps(r.json()["choices"][0]["text"]),
                    f"({time.perf_counter() - t:.2f}s)",
                )
                r = c.post(
                    "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 16},
                )
                print("chat:", json.dumps(r.json()["choices"][0]["message"]["content"]))
                print("usage:", r.json()["usage"])
                info = c.get("/get_server_info").json()
                print("server info:", {k: info[k] for k in ("context_length", "page_size")})
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specserve.demo")
    ap.add_argument("--out", default="runs/demo", help="where report.md, results and plots go")
    args = ap.parse_args(argv)
    if (BUNDLE / "target" / "config.json").is_file():
        return run_bundle(Path(args.out))
    return run_fallback()


if __name__ == "__main__":
    sys.exit(main())
