"""A tiny MoE checkpoint for the multi-process tests (2 ranks, gloo)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_moe_tp_path(tmp_path_factory) -> str:
    from specserve.models.tiny import make_checkpoint

    return str(
        make_checkpoint(
            tmp_path_factory.mktemp("moe_tp") / "qwen3_moe",
            seed=7,
            init_std=0.05,
            model_type="qwen3_moe",
            num_hidden_layers=3,
            mlp_only_layers=[0],
            tie_word_embeddings=True,
        )
    )


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on this shared 2-core machine two threads can be 10x slower (spinning
    OpenMP workers compete with other processes); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
