"""Shared fixtures: tiny random checkpoints written once per test session."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two threads can be 10x slower (spinning
    OpenMP workers compete with other processes); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    from specserve.testing.tiny import make_checkpoint

    return str(make_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen3", seed=0))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> str:
    from specserve.testing.tiny import make_checkpoint

    return str(
        make_checkpoint(
            tmp_path_factory.mktemp("tiny") / "llama",
            seed=1,
            model_type="llama",
            attention_bias=True,
            tie_word_embeddings=True,
        )
    )
