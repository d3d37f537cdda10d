"""Recipes: a YAML file that holds every flag of a training run (`--config recipe.yaml`).

Each key is a flag of the command, spelled with dashes or underscores (`block-size: 7`); a list
is a flag with several values, `true` / `false` turn a switch on or leave it off. The recipe's
flags are read as if written before the command line's own, so a flag given on the command
line wins. A command may also keep sections that are not flags (`train target`'s `model` and
`train`), which its handler reads from the same file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

CONFIG_FLAG = "--config"


class RecipeParser(argparse.ArgumentParser):
    """An argument parser that expands `--config FILE` into the flags the file holds."""

    run_sections: tuple[str, ...] = ()  # keys of the file that are not flags

    def parse_known_args(self, args=None, namespace=None):
        args = list(args or [])
        path = _config_path(args)
        if path is not None and any(a.option_strings == [CONFIG_FLAG] for a in self._actions):
            args = self.recipe_argv(path) + args
        return super().parse_known_args(args, namespace)

    def recipe_argv(self, path: str) -> list[str]:
        options = {opt: a for a in self._actions for opt in a.option_strings}
        try:
            recipe = load_recipe(path)
        except ValueError as e:
            self.error(str(e))
        argv = []
        for key, value in recipe.items():
            if key in self.run_sections:
                continue
            flag = "--" + str(key).replace("_", "-")
            action = options.get(flag)
            if action is None or flag == CONFIG_FLAG:
                self.error(f"{CONFIG_FLAG} {path}: {key!r} is not a flag of this command")
            if isinstance(action, argparse._StoreTrueAction):
                argv += [flag] if value else []
            elif value is not None:
                argv += [flag, *(str(v) for v in (value if isinstance(value, list) else [value]))]
        return argv


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The YAML (or JSON) mapping in `path`; a clear error when it is not one."""
    import yaml

    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{CONFIG_FLAG} {path}: {e}") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"{CONFIG_FLAG} {path}: not a mapping of flags")
    return recipe


def _config_path(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == CONFIG_FLAG and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(CONFIG_FLAG + "="):
            return arg.split("=", 1)[1]
    return None
