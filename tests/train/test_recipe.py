"""Recipes: a YAML file of flags; the command line wins; the shipped recipes are DeepSpec's."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from specserve.cli import build_parser

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# DeepSpec config/{dspark,dflash}/*_qwen3_*.py: the values our flags carry.
DEEPSPEC_LAYERS = {"4b": [1, 9, 17, 25, 33], "8b": [1, 9, 17, 25, 33], "14b": [1, 10, 19, 28, 37]}
DEEPSPEC_COMMON = {
    "block_size": 7,
    "num_layers": 5,
    "mask_token_id": 151669,
    "anchors_per_seq": 512,
    "loss_decay_gamma": 4.0,
    "lr": 6.0e-4,
    "min_lr": 0.0,
    "warmup_ratio": 0.04,
    "weight_decay": 0.0,
    "precision": "bf16",
    "local_batch_size": 1,
    "global_batch_size": 512,
    "num_train_epochs": 10,
    "max_grad_norm": 1.0,
    "seed": 42,
}
DEEPSPEC_HEADS = {
    "dspark": {"markov_rank": 256, "ce_loss_alpha": 0.1, "l1_loss_alpha": 0.9},
    "dflash": {"ce_loss_alpha": 1.0, "l1_loss_alpha": 0.0},
}


def _parse(*argv: str):
    return build_parser().parse_args(["train", "drafter", *argv])


@pytest.mark.parametrize("algorithm", ["dspark", "dflash"])
@pytest.mark.parametrize("size", ["4b", "8b", "14b"])
def test_shipped_recipes_carry_deepspecs_configs(algorithm, size):
    args = _parse("--config", str(RECIPES / f"{algorithm}_qwen3_{size}.yaml"))
    want = DEEPSPEC_COMMON | DEEPSPEC_HEADS[algorithm] | {"algorithm": algorithm}
    assert {k: getattr(args, k) for k in want} == want
    assert args.target_layer_ids == DEEPSPEC_LAYERS[size]
    assert args.target.endswith(f"Qwen3-{size.upper()}") and args.device == "cuda"


def test_command_line_flags_win_over_the_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    recipe = {"algorithm": "dspark", "target": "t", "data": ["a", "b"], "out": "o"}
    path.write_text(yaml.safe_dump(recipe | {"block_size": 5, "cache-target-states": True}))
    args = _parse("--block-size", "3", "--config", str(path), "--data", "c")
    assert args.block_size == 3 and args.data == ["c"] and args.cache_target_states
    assert args.markov_rank == 128  # not in the recipe: the flag's default
    assert _parse("--config", str(path)).data == ["a", "b"]


def test_a_recipe_key_that_is_no_flag_is_named(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("algorithm: dspark\nnum_anchors: 512\n")
    with pytest.raises(SystemExit):
        _parse("--config", str(path))
    assert "'num_anchors' is not a flag of this command" in capsys.readouterr().err
    path.write_text("- just a list\n")
    with pytest.raises(SystemExit):
        _parse("--config", str(path))
    assert "not a mapping of flags" in capsys.readouterr().err


def test_a_recipe_becomes_deepspecs_schedule(tiny_data):
    """10 epochs of the 16 tiny sequences at global batch 4 = 40 steps, 4% of them warm-up,
    cosine to 0, clipping at 1.0, bf16, one sequence per micro-batch."""
    from specserve.train.cli import _drafter_schedule

    recipe = str(RECIPES / "dspark_qwen3_8b.yaml")
    cfg = _drafter_schedule(_parse("--config", recipe, "--data", tiny_data, "--batch-size", "4"))
    assert (cfg.steps, cfg.warmup, cfg.batch_size, cfg.local_batch_size) == (40, 2, 4, 1)
    assert (cfg.lr, cfg.min_lr, cfg.grad_clip, cfg.precision) == (6e-4, 0.0, 1.0, "bf16")
    assert cfg.lr_at(39) < 1e-5 and cfg.micro_batches(2) == (1, 2)
