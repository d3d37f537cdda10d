"""Bad parallel settings fail fast with a message that names the problem; nothing hangs."""

from __future__ import annotations

import time

import pytest

from specserve.cli import main
from specserve.engine.distributed import free_local_addr


def _serve(path: str, *flags: str) -> int:
    return main(["serve", "--model-path", path, "--max-total-tokens", "512", *flags])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tp-size", "3"], "--tp-size 3 does not divide the model's num_attention_heads (4)"),
        (["--ep-size", "3"], "--ep-size 3 does not divide num_experts (8)"),
        (["--tp-size", "2", "--ep-size", "3"], "the smaller must divide the larger"),
        (["--tp-size", "2", "--nnodes", "2"], "--nnodes > 1 needs --dist-init-addr"),
    ],
)
def test_split_the_model_cannot_take(tiny_moe_tp_path, capsys, flags, message):
    assert _serve(tiny_moe_tp_path, *flags) == 2
    assert message in capsys.readouterr().err


def test_ep_size_needs_an_moe_model(tiny_model_path, capsys):
    assert _serve(tiny_model_path, "--ep-size", "2") == 2
    assert "needs an MoE model" in capsys.readouterr().err


@pytest.mark.parametrize("node_rank", ["0", "1"], ids=["rank0-alone", "cannot-reach-rank0"])
def test_missing_rank_times_out_with_a_message(tiny_moe_tp_path, capsys, node_rank):
    """Node 0 waiting for a node that never starts, and a node whose rank 0 is not there."""
    flags = ["--tp-size", "2", "--nnodes", "2", "--node-rank", node_rank]
    start = time.monotonic()
    code = _serve(tiny_moe_tp_path, *flags, "--dist-init-addr", free_local_addr(),
                  "--dist-timeout", "3")  # fmt: skip
    assert code == 2 and time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert "did not all meet" in err and "--dist-timeout" in err


def test_mxfp4_blocks_cannot_be_split(tmp_path, capsys):
    from specserve.testing.tiny import make_checkpoint

    path = make_checkpoint(tmp_path / "m", model_type="qwen3_moe", moe_intermediate_size=32)
    assert _serve(str(path), "--tp-size", "2", "--moe-runner-backend", "mxfp4") == 2
    assert "multiple of 32 (it is 32); raise --ep-size" in capsys.readouterr().err
