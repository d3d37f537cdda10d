"""Shared fixtures: tiny random checkpoints written once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# two pytest-xdist workers (`make test`) share the two cores: one torch thread each, or their
# OpenMP workers spin against each other
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


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
