"""Engine options validated once in the config dataclasses."""

from __future__ import annotations

import os

import pytest
import torch

from specserve.config import ConfigError, EngineConfig, physical_cores
from specserve.llm import LLM


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("attention_backend", "flashinfer", "--attention-backend"),
        ("num_threads", 0, "--num-threads"),
    ],
)
def test_bad_engine_options_name_the_flag(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        EngineConfig(model_path="m", **{field: value})


def test_cpp_attention_backend_refuses_cuda():
    with pytest.raises(ConfigError, match="--attention-backend cpp runs on the CPU"):
        EngineConfig(model_path="m", device="cuda", attention_backend="cpp")


def test_num_threads_sets_torch_threads(tiny_model_path):
    before = torch.get_num_threads()
    try:
        LLM(tiny_model_path, max_total_tokens=256, num_threads=1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        LLM(tiny_model_path, max_total_tokens=256)  # None keeps the process's setting
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_physical_cores_counts_cores_not_hyperthreads():
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
