"""`kochat-trl <stage> --launch ACCELERATE_CONFIG …`: check every setting in this one process, then hand over to
`accelerate launch`.

Launched directly, a mistake is found by every process at once: one error line per machine, then torchrun's own
40-line report of the failed processes, exit 1. Here the recipe's own checks (`recipes.steps.check_recipe`: the
recipe's main() up to the point where it would load a model) run first, under the engine the accelerate config asks for,
so a mistake is one line and exit 2 at any scale, and nothing is spawned. Only then does this process become
`accelerate launch --config_file … -m kochat_trl.recipes.<stage> …` (exec: its exit code is the launch's).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kochat_trl.errors import ConfigError

LAUNCH_OPTIONS = ("--launch", "--num_processes", "--launch_args")
USAGE = (
    "kochat-trl STAGE --launch ACCELERATE_CONFIG [--num_processes N] [--launch_args '…accelerate launch flags…'] "
    "--config FILE [recipe settings]"
)


def split_launch_arguments(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """({option: value} of LAUNCH_OPTIONS, the recipe's own arguments); `--option value` or `--option=value`."""
    options: dict[str, str] = {}
    rest: list[str] = []
    items = list(argv)
    index = 0
    while index < len(items):
        name, equals, value = items[index].partition("=")
        if name in LAUNCH_OPTIONS:
            if not equals:
                missing = index + 1 >= len(items)
                if missing or (name != "--launch_args" and items[index + 1].startswith("--")):
                    raise ConfigError(f"{name} needs a value: {USAGE}")
                value = items[index + 1]
                index += 1
            options[name] = value
        else:
            rest.append(items[index])
        index += 1
    return options, rest


def read_accelerate_config(path: str) -> dict[str, Any]:
    """The accelerate config file as a mapping, or one line naming the file and what is wrong."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: --launch config file not found; pass one of accelerate_configs/*.yaml")
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not a YAML accelerate config ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict) or "distributed_type" not in config:
        raise ConfigError(f"{path}: not an accelerate config (no distributed_type); see accelerate_configs/")
    return config


def _launch_flag(launch_args: list[str], name: str) -> str | None:
    for index, item in enumerate(launch_args):
        flag, equals, value = item.partition("=")
        if flag == name:
            return value if equals else (launch_args[index + 1] if index + 1 < len(launch_args) else None)
    return None


def process_count(config: dict[str, Any], launch_args: list[str], num_processes: str | None) -> int:
    """Processes on this machine: --num_processes, else the one in --launch_args, else the config's (÷ machines)."""
    raw = num_processes or _launch_flag(launch_args, "--num_processes") or config.get("num_processes", 1)
    machines = _launch_flag(launch_args, "--num_machines") or config.get("num_machines", 1)
    try:
        total, machines = int(raw), int(machines)
    except (TypeError, ValueError):
        raise ConfigError(f"--num_processes must be a whole number, got {raw!r}") from None
    if total < 1 or machines < 1:
        raise ConfigError(f"--num_processes must be at least 1, got {total}")
    return max(1, total // machines)


@contextmanager
def engine_environment(config: dict[str, Any]) -> Iterator[None]:
    """The environment variables accelerate launch sets for the config's engine, while the checks run."""
    kind = str(config.get("distributed_type", "NO")).upper()
    values: dict[str, str] = {}
    if kind == "DEEPSPEED":
        stage = (config.get("deepspeed_config") or {}).get("zero_stage", 2)
        values = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)}
    elif kind == "FSDP":
        values = {"ACCELERATE_USE_FSDP": "true"}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _verify_processes_have_devices(processes: int, training_args: Any) -> None:
    """The launch-time form of `checks._verify_processes_joined`: without a GPU per process they never join."""
    import torch

    if processes > 1 and not training_args.use_cpu and torch.cuda.device_count() < processes:
        gpus = torch.cuda.device_count()
        raise ConfigError(
            f"the launch starts {processes} processes but this machine has {gpus} GPU{'s' * (gpus != 1)}; "
            "pass --use_cpu true to train them together on CPU, or --num_processes "
            f"{max(gpus, 1)}"
        )


def launch_checked(command: str, argv: Sequence[str]) -> int:
    """Check the recipe's settings and data as the launched processes would, then exec `accelerate launch`."""
    from kochat_trl.recipes.steps import user_errors

    with user_errors():  # one line and exit 2, as a recipe run prints them
        launch = _checked_launch_command(command, argv)
    from kochat_trl.run.console import note

    note(f"{command}: settings and data checked; {shlex.join(['accelerate', 'launch', *launch[3:]])}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, launch)  # replaces this process: signals and the exit code are the launch's own
    return 0  # not reached


def _checked_launch_command(command: str, argv: Sequence[str]) -> list[str]:
    from kochat_trl.recipes import RECIPES, recipe_arguments, recipe_module
    from kochat_trl.recipes.steps import check_recipe

    options, recipe_args = split_launch_arguments(argv)
    config_file = options["--launch"]
    config = read_accelerate_config(config_file)
    try:
        launch_args = shlex.split(options.get("--launch_args", ""))
    except ValueError as error:
        raise ConfigError(f"--launch_args: {error}") from None
    processes = process_count(config, launch_args, options.get("--num_processes"))
    recipe_args = recipe_arguments(command, recipe_args)
    module = recipe_module(command)
    with engine_environment(config):
        parsed = check_recipe(module.make_parser, module.main, recipe_args)
    _verify_processes_have_devices(processes, parsed[1])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file]
    if "--num_processes" in options:
        launch += ["--num_processes", options["--num_processes"]]
    return [*launch, *launch_args, "-m", f"kochat_trl.recipes.{RECIPES[command][0]}", *recipe_args]
