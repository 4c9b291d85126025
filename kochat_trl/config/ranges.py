"""Allowed ranges of the numeric settings, checked on what the user wrote (YAML config or command line).

Hugging Face and TRL check few of these, and some only after the models are loaded (`num_generations: 0`
crashes RLOOConfig with a ZeroDivisionError, a negative `dataloader_num_workers` fails in the first batch);
others they ignore whenever another setting wins (`num_train_epochs: 0` under `max_steps`, `lora_r: 0` without
`use_peft`, `kl_target: 0` reads as "fixed KL"). A value out of range is a mistake either way, so it is refused
before the dataclasses are even built: one line naming the key, where it was set, the range and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

from kochat_trl.errors import ConfigError


class Range(NamedTuple):
    """`key` must be >= `low` (> `low` unless `inclusive`), below `high` when given, or exactly `unset`."""

    key: str
    low: float
    inclusive: bool
    fix: str = ""  # what to do instead, when more useful than "leave it out for the default (N)"
    high: float | None = None  # exclusive upper bound (fractions, probabilities)
    unset: float | None = None  # a value the library reads as "not set" (max_steps: -1)


_MAX_LENGTH = Range("max_length", 1, True, "set the token limit of a row, e.g. 512")
_BETA = Range("beta", 0, False, "set e.g. 0.1 (how closely the policy keeps to the reference)")

# One table per dataclass, by class name: TRL's experimental configs (PPO, ORPO) are never imported here
# (kochat_trl.rl is the one seam to trl.experimental), and a subclass inherits its bases' rows (its MRO).
RANGES: dict[str, tuple[Range, ...]] = {
    "TrainingArguments": (
        Range("per_device_train_batch_size", 1, True),
        Range("per_device_eval_batch_size", 1, True),
        Range("gradient_accumulation_steps", 1, True),
        Range("learning_rate", 0, False, "set e.g. 1e-4 for LoRA, 1e-5 for full fine-tuning"),
        Range("num_train_epochs", 0, False, "set e.g. 3, or leave it out when max_steps sets the run's length"),
        Range("max_steps", 1, True, "set -1 (the default) to train for num_train_epochs instead", unset=-1),
        Range("logging_steps", 0, False, "give a step count, or a fraction of the run below 1"),
        Range("save_steps", 0, False, "give a step count, or a fraction of the run below 1"),
        Range("eval_steps", 0, False, "give a step count, a fraction of the run below 1, or leave it out"),
        Range("warmup_steps", 0, True, "set 0 for no warmup"),
        Range("save_total_limit", 1, True, "leave it out to keep every checkpoint (Hugging Face silently reads 0 so)"),
        Range("dataloader_num_workers", 0, True, "set 0 to load batches in the training process"),
        Range("seed", 0, True, "set e.g. 42 (numpy takes seeds from 0 to 2**32 - 1)"),
    ),
    "SFTConfig": (_MAX_LENGTH,),
    "RewardConfig": (_MAX_LENGTH,),
    "DPOConfig": (_MAX_LENGTH, _BETA),
    "KTOConfig": (
        _MAX_LENGTH,
        _BETA,
        Range("desirable_weight", 0, False),
        Range("undesirable_weight", 0, False),
    ),
    "ORPOConfig": (
        _MAX_LENGTH,
        Range("beta", 0, False, "set e.g. 0.1 (the weight of the odds-ratio term)"),
        Range("max_completion_length", 1, True),
    ),
    "PPOConfig": (
        Range("num_ppo_epochs", 1, True, "set the passes over each rollout batch, e.g. 4"),
        Range("num_mini_batches", 1, True, "set 1 to update on each rollout batch as a whole"),
        Range("response_length", 1, True, "set the token limit of a sampled answer, e.g. 48"),
        Range("total_episodes", 1, True, "leave it out to train num_train_epochs over the prompts"),
        Range("local_rollout_forward_batch_size", 1, True),
        Range("temperature", 0, False, "set a sampling temperature such as 0.7"),
        Range("kl_coef", 0, True, "set 0 to turn the KL penalty off"),
        Range("cliprange", 0, False),
        Range("cliprange_value", 0, False),
        Range("num_sample_generations", 0, True, "set 0 to sample no debugging answers"),
    ),
    **{
        name: (
            Range(
                "num_generations", 2, True, "sample e.g. 4 answers per prompt: the baseline compares each with the rest"
            ),
            Range("max_completion_length", 1, True, "set the token limit of a sampled answer, e.g. 48"),
            Range("temperature", 0, False, "set a sampling temperature such as 0.7"),
            Range("beta", 0, True, "set 0 to turn the KL penalty off"),
            Range("num_iterations", 1, True),
            Range("epsilon", 0, False),
            Range("generation_batch_size", 1, True),
            Range("steps_per_generation", 1, True),
        )
        for name in ("RLOOConfig", "GRPOConfig")
    },
    "ModelConfig": (
        Range("lora_r", 1, True, "set e.g. 16, or leave it out without use_peft"),
        Range("lora_alpha", 0, False, "set e.g. twice lora_r (0 scales the adapter to nothing)"),
        Range("lora_dropout", 0, True, high=1),
    ),
    "KochatArguments": (
        Range("max_samples", 1, True, "leave it out to use all rows"),
        Range("eval_fraction", 0, True, "set 0 to hold out nothing", high=1),
    ),
    "RLArguments": (
        Range("eval_prompts", 1, True),
        Range("eval_samples_per_prompt", 1, True),
        Range("kl_bound", 0, False, "leave it out to report no bound"),
    ),
    "PPOScriptArguments": (  # recipes/ppo.py
        Range("kl_target", 0, False, "leave it out for a fixed kl_coef (0 would silently mean that)"),
    ),
    "PreferenceScriptArguments": (  # recipes/dpo.py
        Range("prompts_eval_fraction", 0, False, high=1),
        Range("eval_prompts", 1, True),
        Range("eval_samples_per_prompt", 1, True),
        Range("eval_max_new_tokens", 1, True),
        Range("eval_temperature", 0, False, "set a sampling temperature such as 0.7"),
        Range("kl_bound", 0, False, "leave it out to report no bound"),
    ),
}


def ranges_of(dataclass_types: Sequence[type]) -> dict[str, Range]:
    """The rows that apply to a parser's dataclasses, by key (a subclass's row replaces its base's)."""
    rows: dict[str, Range] = {}
    for dataclass_type in dataclass_types:
        fields = {item.name for item in dataclasses.fields(dataclass_type)}
        for klass in reversed(dataclass_type.__mro__):
            rows.update({row.key: row for row in RANGES.get(klass.__name__, ()) if row.key in fields})
    return rows


def allowed(row: Range) -> str:
    """The range in words: `at least 1`, `> 0`, `in [0, 1)`."""
    low = _number(row.low)
    if row.high is not None:
        text = f"in {'[' if row.inclusive else '('}{low}, {_number(row.high)})"
    else:
        text = f"at least {low}" if row.inclusive else f"> {low}"
    return text if row.unset is None else f"{text} (or {_number(row.unset)})"


def violation(row: Range, value: float) -> bool:
    """Whether `value` lies outside `row`'s range (its `unset` value is inside)."""
    if row.unset is not None and value == row.unset:
        return False
    below = value < row.low if row.inclusive else value <= row.low
    return below or (row.high is not None and value >= row.high)


def check_ranges(parser: Any, config: dict[str, Any], config_path: str | None, args: Sequence[str]) -> None:
    """Refuse the first value out of its range: the command line's (which wins), else the config file's.

    Values that do not convert (`learning_rate: abc`) are left to argparse, which names them itself.
    """
    rows = ranges_of(parser.dataclass_types)
    actions = {action.dest: action for action in parser._actions}
    given = {key: (value, f"{config_path}: ") for key, value in config.items()}
    given.update({key: (value, "--") for key, value in command_line_values(args).items()})
    for key, (value, where) in given.items():
        row = rows.get(key)
        if row is None or value is None or isinstance(value, bool):
            continue
        try:
            number = actions[key].type(value) if isinstance(value, str) else value
        except (TypeError, ValueError):
            continue
        if isinstance(number, (int, float)) and violation(row, number):
            default = actions[key].default
            fix = row.fix or "leave it out for the default" + (f" ({default})" if default is not None else "")
            raise ConfigError(f"{where}{key} must be {allowed(row)}, got {value}; {fix}")


def command_line_values(args: Sequence[str]) -> dict[str, str]:
    """`--key value` / `--key=value` as {key: value} (the last one wins, as in argparse; dashes read as `_`)."""
    values = {}
    for index, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, equals, value = arg[2:].partition("=")
        if not equals:
            if index + 1 >= len(args) or args[index + 1].startswith("--"):
                continue
            value = args[index + 1]
        values[name.replace("-", "_")] = value
    return values


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
