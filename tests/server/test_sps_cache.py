"""The SPS table cache key: one file per model, step-relevant flags and machine."""

from __future__ import annotations

import argparse
import os
import shutil

from specserve.server.cli import register, sps_cache_path


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_the_key_follows_the_model_and_step_flags_only(tiny_model_path, tmp_path):
    model = shutil.copytree(tiny_model_path, tmp_path / "model")
    base = ["--model-path", str(model), "--speculative-algorithm", "DSPARK"]
    path = sps_cache_path(_args(*base), tmp_path)
    assert path.parent == tmp_path and path.suffix == ".json"
    # flags that cannot change a step's time keep the file
    same = _args(*base, "--port", "1234", "--api-key", "k", "--shutdown-timeout", "5")
    assert sps_cache_path(same, tmp_path) == path
    # ones that can, or another checkpoint, get their own
    for other in (
        _args(*base, "--chunked-prefill-size", "512"),
        _args(*base, "--dtype", "bfloat16"),
        _args(*base, "--max-running-requests", "8"),
    ):
        assert sps_cache_path(other, tmp_path) != path
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(0, 0))  # a rewritten checkpoint
    assert sps_cache_path(_args(*base), tmp_path) != path


def test_the_default_folder_is_the_user_cache(tiny_model_path, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = sps_cache_path(_args("--model-path", tiny_model_path))
    assert path.parent == tmp_path / "specserve" / "sps"
