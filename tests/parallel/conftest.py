"""A tiny MoE checkpoint for the multi-process tests (2 ranks, gloo)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_moe_tp_path(tmp_path_factory) -> str:
    from specserve.testing.tiny import make_checkpoint

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
def _one_thread(one_thread):
    yield
