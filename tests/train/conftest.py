"""A tiny target, its prompts and target-generated data, built once per session."""

from __future__ import annotations

import json

import pytest
import torch

PROMPT_LEN, NEW_TOKENS = 12, 16


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> str:
    from specserve.testing.tiny import make_checkpoint

    path = tmp_path_factory.mktemp("train") / "target"
    return str(make_checkpoint(path, seed=3, init_std=0.08, num_hidden_layers=4))


@pytest.fixture(scope="session")
def tiny_data(tiny_target, tmp_path_factory) -> str:
    from specserve.train.gendata import generate_dataset

    root = tmp_path_factory.mktemp("data")
    gen = torch.Generator().manual_seed(0)
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(16):
            ids = torch.randint(3, 512, (PROMPT_LEN,), generator=gen).tolist()
            f.write(json.dumps({"domain": "code" if i % 2 else "prose", "token_ids": ids}) + "\n")
    out = root / "data"
    generate_dataset(
        tiny_target, root / "prompts.jsonl", out, PROMPT_LEN, NEW_TOKENS, 1.0, batch_size=16
    )
    return str(out)
