"""`kochat-trl sft|rm|ppo|rloo|grpo|dpo --config FILE`: the training recipes, run as TRL runs `trl sft --config`;
with `--launch ACCELERATE_CONFIG`, checked here and then run by `accelerate launch` (`kochat_trl.cli.launcher`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from kochat_trl.recipes import RECIPES


def register(commands: argparse._SubParsersAction) -> None:
    """List the recipes in `kochat-trl --help`; their arguments are the recipe's TrlParser's (`kochat-trl sft -h`)."""
    for command, (_, what, _) in RECIPES.items():
        commands.add_parser(
            command,
            help=f"{what}; --config FILE [--launch ACCELERATE_CONFIG: check, then accelerate launch]",
            add_help=False,
        )


def run(command: str, argv: Sequence[str]) -> int:
    """Parse `argv` with the recipe's own parser and train; errors exit as its script's do (2, 128 + signal).
    With `--launch ACCELERATE_CONFIG`, check everything here first, then hand over to `accelerate launch`."""
    if any(arg == "--launch" or arg.startswith("--launch=") for arg in argv):
        from kochat_trl.cli.launcher import launch_checked

        return launch_checked(command, argv)
    from kochat_trl.recipes import launch

    launch(command, list(argv))
    return 0
