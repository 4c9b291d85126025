"""The training recipes, one module per stage, shipped in the package like TRL's `trl/scripts`.

`steps` holds what every recipe does the same way: parse and check, prepare the run folder, finish with metrics.

Each module reads top to bottom like TRL's own script: `make_parser()` (TrlParser over the stage's dataclasses)
and `main(script_args, training_args, model_args)`. They run as `kochat-trl <stage> --config FILE`,
`python -m kochat_trl.recipes.<module>`, `accelerate launch -m kochat_trl.recipes.<module>`, or through the thin
scripts in the repository's `recipes/` folder.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

# command -> (module, what it trains, arguments the command adds). RLOO and GRPO share one recipe (rl.py), as do
# DPO/KTO/ORPO (dpo.py, --trainer kto|orpo); `kochat-trl rloo|grpo` says which trainer unless --trainer does.
RECIPES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "sft": ("sft", "stage 1: supervised fine-tuning on prompt/answer pairs", ()),
    "rm": ("reward", "stage 2: a reward model from ranked answers", ()),
    "ppo": ("ppo", "stage 3: PPO against the reward model", ()),
    "rloo": ("rl", "stage 3 without a critic: TRL's RLOO", ("--trainer", "rloo")),
    "grpo": ("rl", "stage 3 without a critic: TRL's GRPO", ("--trainer", "grpo")),
    "dpo": ("dpo", "direct preference optimisation (DPO; --trainer kto or orpo)", ()),
}


def recipe_module(command: str) -> ModuleType:
    """The recipe module a `kochat-trl` command runs (sft, rm, ppo, rloo, grpo, dpo)."""
    return importlib.import_module(f"kochat_trl.recipes.{RECIPES[command][0]}")


def recipe_arguments(command: str, argv: Sequence[str]) -> list[str]:
    """`argv` plus what the command adds (`--trainer rloo` for `kochat-trl rloo`) unless `argv` says otherwise."""
    args = list(argv)
    if not any(arg == "--trainer" or arg.startswith("--trainer=") for arg in args):
        args += RECIPES[command][2]
    return args


def launch(command: str, argv: Sequence[str] | None = None) -> None:
    """Parse `argv` (default: the command line) and run the recipe, as its script's `__main__` does."""
    import sys

    from kochat_trl.recipes.steps import run_recipe

    module = recipe_module(command)
    run_recipe(module.make_parser, module.main, recipe_arguments(command, sys.argv[1:] if argv is None else argv))
