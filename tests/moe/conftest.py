"""Tiny Qwen3-MoE checkpoints, written once per session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_moe_path(tmp_path_factory) -> str:
    """Layer 0 dense (mlp_only_layers), layers 1-2 sparse: both MLP kinds in one model."""
    from specserve.models.tiny import make_checkpoint

    return str(
        make_checkpoint(
            tmp_path_factory.mktemp("moe") / "qwen3_moe",
            seed=3,
            init_std=0.05,
            model_type="qwen3_moe",
            num_hidden_layers=3,
            mlp_only_layers=[0],
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
