"""The tiny DeepSeek-V4 checkpoint of issue 16, written once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_v4_path(tmp_path_factory) -> str:
    from specserve.testing.tiny import make_deepseek_v4_checkpoint

    return str(make_deepseek_v4_checkpoint(tmp_path_factory.mktemp("v4") / "dsv4", seed=0))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
