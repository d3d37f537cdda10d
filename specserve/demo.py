"""`make demo`: the seed's comparison on the bundled demo model, scaled to a laptop CPU.

With `models/demo/` present, it runs `bench compare` with three arms (NONE, NEXTN = the seed's
MTP baseline, DSPARK) and two workloads, the seed's A (1K in / 1K out, one stream) and B (64K
in / 3K out, 10 users), both scaled down as `plan_workloads` says, in `--rounds` runs (default
two, the arms started in reverse order every other run), and prints the last run's report and
the rounds' summary (min / median per arm, and of DSPARK's ratios to the other arms). A
workload the bundle cannot serve (no long held-out prompts, or a context too short) is skipped
with the reason printed. Without the bundle it serves a small random model and sends a few
requests, so the command always shows something real.
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def run_bundle(bundle: Path, out: Path, rounds: int = 2) -> int:
    """`bench compare` of the three arms on both workloads, `rounds` times with the arms' order
    reversed every other round (NONE, MTP, DSPARK, then DSPARK, MTP, NONE), so that a busy spell
    of the host, or whatever the first server of a run pays, does not always fall on one arm.
    Prints the last round's report and the rounds' summary (`rounds_summary`)."""
    from specserve.bench.compare import run_compare

    out.mkdir(parents=True, exist_ok=True)
    workloads, notes = plan_workloads(bundle, out)
    for note in notes:
        print(f"note: {note}", flush=True)
    if not workloads:
        print("no workload fits this bundle; nothing to compare", file=sys.stderr)
        return 1
    config = compare_config(bundle, workloads, notes, attention_backend())
    code, results, report = 0, [], out / "report.md"
    for rnd in range(rounds):
        run_out = out if rounds == 1 else out / f"round-{rnd + 1}"
        run_out.mkdir(exist_ok=True)
        reverse = rnd % 2 == 1
        cfg_path = run_out / "compare.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        order = " (arms in reverse order)" if reverse else ""
        print(f"bench compare --config {cfg_path} --out {run_out}{order}", flush=True)
        code = max(code, run_compare(cfg_path, run_out, reverse=reverse))
        lines = (run_out / "results.jsonl").read_text().splitlines()
        results += [dict(json.loads(x), round=rnd + 1) for x in lines if x.strip()]
        report = run_out / "report.md"
    if report.is_file():
        print("\n" + report.read_text())
    if rounds > 1:
        summary = rounds_summary([a["name"] for a in config["arms"]], workloads, results)
        (out / "summary.md").write_text(summary + "\n")
        print(summary)
    return code


def rounds_summary(arms: list[str], workloads: list[dict], results: list[dict]) -> str:
    """Markdown: per workload, each arm's output throughput over the rounds (min / median) and
    accept length, and the last arm (DSPARK) against each other arm as the min / median of the
    rounds' own ratios (each ratio from one round's pair of runs)."""
    from specserve.bench.report import greedy_matches

    rounds = sorted({r["round"] for r in results})
    out = [f"## {len(rounds)} rounds, the arms' order reversed every other round", ""]
    for wl in workloads:
        got = {
            (r["arm"], r["round"]): r
            for r in results
            if r.get("workload") == wl["name"] and r.get("completed")
        }
        out += [f"### {wl['name']}", ""]
        out += ["| arm | output tok/s min / median | accept length (median) |", "|---|---|---|"]
        tok = {a: [got[a, n]["output_throughput"] for n in rounds if (a, n) in got] for a in arms}
        for a in arms:
            acc = [got[a, n].get("accept_length") for n in rounds if (a, n) in got]
            acc = [x for x in acc if x is not None]
            if tok[a]:
                cell = f"{min(tok[a]):.1f} / {statistics.median(tok[a]):.1f}"
                med = f"{statistics.median(acc):.2f}" if acc else "—"
                out.append(f"| {a} | {cell} | {med} |")
        cand = arms[-1]
        for other in arms[:-1]:
            ratios = [
                got[cand, n]["output_throughput"] / got[other, n]["output_throughput"]
                for n in rounds
                if (cand, n) in got and (other, n) in got
            ]
            if ratios:
                out.append(
                    f"\n{cand} vs {other}: {min(ratios):.2f}x / {statistics.median(ratios):.2f}x "
                    "(min / median of the rounds' ratios)"
                )
        checks = {
            n: greedy_matches(arms, {a: got[a, n] for a in arms if (a, n) in got}, wl)
            for n in rounds
        }
        compared = [n for n, matches in checks.items() if matches]
        differ = [n for n in compared if not all(ok for _, _, ok in checks[n].values())]
        if differ:
            out.append(f"\nGreedy outputs DIFFER from {arms[0]}'s in rounds {differ}.")
        elif compared:
            out.append(
                f"\nGreedy outputs identical to {arms[0]}'s in every round compared "
                f"({len(compared)} of {len(rounds)})."
            )
        out.append("")
    return "\n".join(out)


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
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="compare runs, the arms' order reversed every other one (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if (args.bundle / "target" / "config.json").is_file():
        return run_bundle(args.bundle, Path(args.out), args.rounds)
    return run_fallback(args.bundle)


if __name__ == "__main__":
    sys.exit(main())
