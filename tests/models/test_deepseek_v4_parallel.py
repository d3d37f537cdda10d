"""DeepSeek-V4 over two gloo processes: --tp-size 2, --ep-size 2 and both give the single
process's greedy tokens (also with its MTP layer drafting on rank 0)."""

from __future__ import annotations

import pytest
import torch

from specserve.cli import build_parser
from specserve.core import SamplingParams
from specserve.server.cli import build_engine

PROMPTS = [[5, 17, 300, 42, 5, 17, 300], list(range(100, 131)), [7, 8, 9, 7, 8, 9, 7, 8]]


def _generate(path: str, *flags: str) -> list[list[int]]:
    args = build_parser().parse_args(
        ["serve", "--model-path", path, "--max-total-tokens", "1024", "--page-size", "8",
         "--dist-timeout", "60", *flags]
    )  # fmt: skip
    threads = torch.get_num_threads()
    engine, _ = build_engine(args)
    try:
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        reqs = [engine.add_request(p, params) for p in PROMPTS]
        while engine.has_unfinished():
            engine.step()
        return [r.output_token_ids for r in reqs]
    finally:
        engine.close()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single(tiny_v4_path):
    return _generate(tiny_v4_path)


@pytest.mark.parametrize(
    "flags",
    [("--tp-size", "2"), ("--ep-size", "2"), ("--tp-size", "2", "--ep-size", "2")],
    ids=["tp2", "ep2", "tp2-ep2"],
)
def test_parallel_greedy_equals_single_process(tiny_v4_path, single, flags):
    assert _generate(tiny_v4_path, *flags) == single


def test_parallel_nextn_is_lossless(tiny_v4_path, single):
    nextn = ("--speculative-algorithm", "NEXTN", "--speculative-draft-model-path", tiny_v4_path)
    assert _generate(tiny_v4_path, "--tp-size", "2", *nextn) == single
