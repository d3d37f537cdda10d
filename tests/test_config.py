"""Engine options validated once in the config dataclasses."""

from __future__ import annotations

import os

import pytest
import torch

from specserve.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, physical_cores
from specserve.engine.model_runner import num_kv_blocks
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


def test_bad_kv_cache_dtype_names_the_flag():
    with pytest.raises(ConfigError, match="--kv-cache-dtype must be auto or one of"):
        CacheConfig(kv_cache_dtype="fp8_e4m3")


def test_a_16_bit_kv_cache_holds_twice_the_tokens(tiny_model_path, monkeypatch):
    """The same memory fraction, half the bytes a token: twice the blocks; "auto" is the model's
    dtype, "bf16" SGLang's spelling of bfloat16."""
    from types import SimpleNamespace

    from specserve.engine import model_runner

    # free memory held still, so that the two sizings see the same bytes
    monkeypatch.setattr(
        model_runner.psutil, "virtual_memory", lambda: SimpleNamespace(available=1 << 30)
    )
    cfg = ModelConfig.from_pretrained(tiny_model_path)
    cache = CacheConfig(mem_fraction_static=0.01)
    assert cache.kv_dtype(torch.float32) == torch.float32
    assert CacheConfig(kv_cache_dtype="bf16").kv_dtype(torch.float32) == torch.bfloat16
    wide = num_kv_blocks(cfg, cache, torch.float32)
    narrow = num_kv_blocks(cfg, cache, torch.bfloat16)
    assert wide > 4 and narrow in (2 * wide, 2 * wide + 1)  # floor division of twice the count
    llm = LLM(tiny_model_path, max_total_tokens=256, kv_cache_dtype="float16")
    assert {c.dtype for c in llm.engine.runner.kv_cache} == {torch.float16}
    assert llm.generate([1, 2, 3])[0].outputs[0].token_ids


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
