"""`make demo`: the seed's comparison on the bundled demo model, scaled to a laptop CPU.

With `models/demo/` present, it runs `bench compare` with three arms (NONE, NEXTN = the seed's
MTP baseline, DSPARK) and two workloads, the seed's A (1K in / 1K out, one stream) and B (64K
in / 3K out, 10 users), both scaled down as `plan_workloads` says, and prints the report. A
workload the bundle cannot serve (no long held-out prompts, or a context too short) is skipped
with the reason printed. Without the bundle it serves a small random model and sends a few
requests, so the command always shows something real.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import yaml

from specserve.bench.datasets import domains_in_turn

BUNDLE = Path("models/demo")  # from the repository root, where `make demo` runs; or --bundle

LONG_PROMPTS = "prompts_long.jsonl"  # whole held-out files (code and prose), one per prompt


@dataclass(frozen=True)
class Workload:
    """One seed workload scaled to this CPU: prompts of `input_len` tokens cut from whole
    held-out files, `output_len` tokens out, `users` at once."""

    key: str
    seed: str
    input_len: int
    output_len: int
    users: int
    prompts: int

    @property
    def name(self) -> str:
        streams = "1 stream" if self.users == 1 else f"{self.users} users"
        return f"{self.key}: {self.input_len} in / {self.output_len} out, {streams} (seed: {self.seed})"


WORKLOADS = (
    Workload("A", "1K/1K x1", 256, 512, 1, 4),
    Workload("B", "64K/3K x10", 2048, 256, 10, 10),
)


def plan_workloads(bundle: Path, out: Path) -> tuple[list[dict], list[str]]:
    """The seed's workloads on held-out text of the bundle (`bench compare` entries), and what
    had to change, said in words: prompts are whole held-out files of at least `input_len`
    tokens cut to it (never snippets joined; cut from this machine's held-out sources when the
    bundle ships none), and a workload longer than the target's context runs with the longest
    prompts that fit."""
    context = json.loads((bundle / "target" / "config.json").read_text())
    context = int(context.get("max_position_embeddings", 0))
    notes = []
    long_file = bundle / LONG_PROMPTS
    if not long_file.is_file():
        long_file = out / LONG_PROMPTS
        longest = max(w.input_len for w in WORKLOADS)
        n = write_heldout_prompts(bundle / "target", long_file, longest, WORKLOADS[-1].prompts)
        notes.append(
            f"the bundle ships no {LONG_PROMPTS}: cut {n} held-out files (never trained on; the "
            f"same path-hash split) from this machine's stdlib and man pages to {longest} tokens"
        )
    entries = []
    for w in WORKLOADS:
        if w.input_len + w.output_len > context:
            fit = replace(w, input_len=context - w.output_len)
            notes.append(
                f"{w.name}: the bundle's target has a context of {context} tokens, less than "
                f"{w.input_len} + {w.output_len}; running it with {fit.input_len}-token prompts "
                "instead (`make demo-model` builds a 4K-context bundle)"
            )
            w = fit
        prompts = domains_in_turn(long_file, w.input_len)[: w.prompts]
        if not prompts:
            notes.append(f"{w.name}: skipped, no held-out file has {w.input_len} tokens")
            continue
        path = out / f"workload_{w.key.lower()}.jsonl"
        path.write_text(
            "".join(json.dumps({"prompt": p, "output_len": w.output_len}) + "\n" for p in prompts)
        )
        entries.append(
            {
                "name": w.name,
                "dataset_path": str(path),
                "num_prompts": len(prompts),
                "max_concurrency": w.users,
                "dataset_name": "jsonl",
                "ignore_eos": True,
                "temperature": 0.0,
                "output_details": True,  # the texts, so the report checks greedy identity
            }
        )
    return entries, notes


def write_heldout_prompts(
    tokenizer_dir: str | Path, path: str | Path, length: int, per_domain: int
) -> int:
    """The first `length` tokens of `per_domain` held-out files per domain that have that many,
    as a prompts file (`domain`, `token_ids`, `source`); -> prompts written."""
    from specserve.bench.datasets import Tokenizer
    from specserve.train.data import heldout_documents

    path = Path(path)

    tok, made, lines = Tokenizer(tokenizer_dir), {}, []
    for domain, rel, text in heldout_documents():
        if made.get(domain, 0) == per_domain:
            if domain == "prose":
                break
            continue
        ids = tok.encode(text)
        if len(ids) >= length:
            lines.append({"domain": domain, "token_ids": ids[:length], "source": rel})
            made[domain] = made.get(domain, 0) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return len(lines)


def attention_backend() -> str:
    """`cpp` (the compiled paged-attention kernel) when it builds on this machine, else the pure
    PyTorch `torch` backend, with the reason printed. Every arm uses the same one."""
    from specserve.kernels import KernelUnavailable, load

    try:
        load()
        return "cpp"
    except KernelUnavailable as e:
        print(f"note: {e}; the demo uses --attention-backend torch", flush=True)
        return "torch"


def compare_config(
    bundle: Path, workloads: list[dict], notes: list[str] = (), backend: str = "torch"
) -> dict:
    target = str(bundle / "target")
    common = (
        f"--model-path {target} --served-model-name demo --max-total-tokens 32768 "
        f"--attention-backend {backend}"
    )
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
        "notes": "The seed's workloads scaled to a 2-core CPU and the demo model, on whole "
        "held-out files (code and prose, one per prompt) the bundle never trained on: "
        + "; ".join(
            f"{w.key} {w.seed} -> {w.input_len}/{w.output_len} x{w.users}" for w in WORKLOADS
        )
        + " (inputs 4x and 32x shorter, outputs 2x and 12x, so the three arms run in minutes "
        f"on a CPU). Greedy, ignore_eos, --attention-backend {backend} on every arm. "
        "Gain = last arm vs the baseline arm (the seed's MTP)."
        + "".join(f" Note: {n}." for n in notes),
        "baseline": arms[1]["name"] if len(arms) > 2 else arms[0]["name"],
        "arms": arms,
        "workloads": workloads,
    }


def run_bundle(bundle: Path, out: Path) -> int:
    from specserve.bench.compare import run_compare

    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "compare.yaml"
    workloads, notes = plan_workloads(bundle, out)
    for note in notes:
        print(f"note: {note}", flush=True)
    if not workloads:
        print("no workload fits this bundle; nothing to compare", file=sys.stderr)
        return 1
    config = compare_config(bundle, workloads, notes, attention_backend())
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"bench compare --config {cfg_path} --out {out}", flush=True)
    code = run_compare(cfg_path, out)
    report = out / "report.md"
    if report.is_file():
        print("\n" + report.read_text())
    return code


def run_fallback(bundle: Path) -> int:
    """No bundle yet: serve a small random model and show a few requests end to end."""
    from specserve.bench.compare import CompareError, ServerProcess
    from specserve.ports import free_port
    from specserve.testing.tiny import make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "tiny-random")
        print(f"no demo bundle in {bundle}; serving a random tiny model from {path}")
        port = free_port()
        argv = [sys.executable, "-m", "specserve", "serve", "--model-path", str(path)]
        argv += ["--port", str(port), "--max-total-tokens", "8192", "--log-level", "warning"]
        server = ServerProcess(argv, Path(tmp) / "server.log", f"http://127.0.0.1:{port}")
        server.start()
        try:
            server.wait_healthy(120)
            with httpx.Client(base_url=server.base_url, timeout=60) as c:
                _show_requests(c)
        except CompareError as e:
            print(f"the server did not start: {e}", file=sys.stderr)
            return 1
        finally:
            server.stop(30)
    return 0


def _show_requests(c: httpx.Client) -> None:
    t = time.perf_counter()
    body = {"prompt": "def fib(n):", "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    r = c.post("/v1/completions", json=body)
    text = json.dumps(r.json()["choices"][0]["text"])
    print("completion:", text, f"({time.perf_counter() - t:.2f}s)")
    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    r = c.post("/v1/chat/completions", json=chat)
    print("chat:", json.dumps(r.json()["choices"][0]["message"]["content"]))
    print("usage:", r.json()["usage"])
    info = c.get("/get_server_info").json()
    print("server info:", {k: info[k] for k in ("context_length", "page_size")})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specserve.demo")
    ap.add_argument("--out", default="runs/demo", help="where report.md, results and plots go")
    ap.add_argument(
        "--bundle", type=Path, default=BUNDLE, help="the demo bundle folder (default: %(default)s)"
    )
    args = ap.parse_args(argv)
    if (args.bundle / "target" / "config.json").is_file():
        return run_bundle(args.bundle, Path(args.out))
    return run_fallback(args.bundle)


if __name__ == "__main__":
    sys.exit(main())
