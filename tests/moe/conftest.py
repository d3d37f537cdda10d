"""Tiny Qwen3-MoE checkpoints, written once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_moe_path(tmp_path_factory) -> str:
    """Layer 0 dense (mlp_only_layers), layers 1-2 sparse: both MLP kinds in one model."""
    from specserve.testing.tiny import make_checkpoint

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
def _one_thread(one_thread):
    yield
