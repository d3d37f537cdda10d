"""--tp-size 2 / --ep-size 2 over two gloo processes give the single process's greedy tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specserve.cli import build_parser
from specserve.core import SamplingParams
from specserve.engine.distributed import free_local_addr
from specserve.engine.engine import EngineStats
from specserve.server.cli import build_engine

PROMPTS = [[5, 17, 300, 42, 5, 17, 300], list(range(100, 131)), [7, 8, 9, 7, 8, 9, 7, 8]]


def _generate(path: str, *flags: str) -> tuple[list[list[int]], EngineStats]:
    args = build_parser().parse_args(
        ["serve", "--model-path", path, "--max-total-tokens", "1024", "--page-size", "8",
         "--dist-timeout", "60", *flags]
    )  # fmt: skip
    threads = torch.get_num_threads()
    engine, _ = build_engine(args)
    try:
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        reqs = [engine.add_request(p, params) for p in PROMPTS]
        while engine.has_unfinished():
            engine.step()
        return [r.output_token_ids for r in reqs], engine.stats
    finally:
        engine.close()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single(tiny_moe_tp_path):
    return _generate(tiny_moe_tp_path)[0]


@pytest.mark.parametrize(
    "flags",
    [("--tp-size", "2"), ("--ep-size", "2"), ("--tp-size", "2", "--ep-size", "2")],
    ids=["tp2", "ep2", "tp2-ep2"],
)
def test_parallel_greedy_equals_single_process(tiny_moe_tp_path, single, flags):
    tokens, _ = _generate(tiny_moe_tp_path, *flags)
    assert tokens == single


@pytest.mark.parametrize("flags", [("--tp-size", "2"), ("--ep-size", "2")], ids=["tp2", "ep2"])
def test_parallel_ngram_speculation_is_lossless(tiny_moe_tp_path, single, flags):
    ngram = ("--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "4")
    ngram += ("--no-speculative-adaptive-drafting",)  # windows on every step, on both ranks
    tokens, stats = _generate(tiny_moe_tp_path, *flags, *ngram)
    assert tokens == single
    assert (
        stats.avg_accept_length > 1.2
    )  # drafts were accepted, so verify windows ran across both ranks


@pytest.fixture(scope="module")
def drafters(tiny_moe_tp_path, tmp_path_factory) -> dict[str, str]:
    """Random MTP and DFlash drafters for the tiny MoE target (their proposals are mostly
    rejected: what matters is that verify windows run across the ranks losslessly)."""
    from specserve.speculative.checkpoint import new_drafter, save_drafter

    raw = json.loads((Path(tiny_moe_tp_path) / "config.json").read_text())
    root = tmp_path_factory.mktemp("drafters")
    dflash = new_drafter(raw, "dflash", target_layer_ids=[-1, 1], block_size=4, mask_token_id=3)
    return {
        "NEXTN": str(save_drafter(new_drafter(raw, "mtp"), root / "mtp")),
        "DFLASH": str(save_drafter(dflash, root / "dflash")),
    }


@pytest.mark.parametrize("algorithm", ["NEXTN", "DFLASH"])
def test_tp2_model_drafter_is_lossless(tiny_moe_tp_path, single, drafters, algorithm):
    spec = ("--speculative-algorithm", algorithm, "--speculative-draft-model-path",
            drafters[algorithm])  # fmt: skip
    tokens, stats = _generate(tiny_moe_tp_path, "--tp-size", "2", *spec)
    assert tokens == single
    assert stats.num_draft_tokens > 0


def test_two_nodes_on_one_machine(tiny_moe_tp_path, single):
    """--nnodes 2: node 1 is its own `specserve serve` process (no HTTP), node 0 serves."""
    addr = free_local_addr()
    node = ["--tp-size", "2", "--ep-size", "2", "--nnodes", "2", "--dist-init-addr", addr]
    node1 = subprocess.Popen(
        [sys.executable, "-m", "specserve", "serve", "--model-path", tiny_moe_tp_path,
         "--max-total-tokens", "1024", "--page-size", "8", "--dist-timeout", "60",
         "--node-rank", "1", *node],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        tokens, _ = _generate(tiny_moe_tp_path, "--node-rank", "0", *node)
        assert node1.wait(timeout=30) == 0  # rank 0's shutdown stops the other node cleanly
    finally:
        if node1.poll() is None:
            node1.kill()
    assert tokens == single
