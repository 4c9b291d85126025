"""What every recipe does around its trainer: parse the config, prepare the run folder, finish it.

A recipe reads like TRL's own scripts (`TrlParser` → dataclasses → trainer → train → save); the
steps all of them share live here once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kochat_trl.errors import EXIT_USER_ERROR, ConfigError, DataError, KochatError, print_error_line
from kochat_trl.outputs import write_json_atomic, write_text_atomic

METRICS_FILE = "metrics.json"  # written last: its presence means the stage finished


@dataclass
class KochatArguments:
    """Data and run settings shared by the kochat-trl recipes (TRL's ScriptArguments, Korean data)."""

    dataset_name: str = field(
        default="bundled:sft",
        metadata={"help": "Data file (any supported layout), bundled:sft|rm|ppo, or a hub dataset id."},
    )
    template: str | None = field(
        default=None,
        metadata={
            "help": "Prompt template, installed as the tokenizer's chat template: kochatgpt, kochatgpt_short, "
            "koalpaca, kullm, or chat (the model's own). Default: the chat template the model folder carries, "
            "else kochatgpt."
        },
    )
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of rows held out for evaluation."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows (quick trials)."})
    init_tiny: bool = field(
        default=False,
        metadata={"help": "Build the embedded tiny model at model_name_or_path first if it is not there."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})
    verbose: bool = field(
        default=False,
        metadata={"help": "Keep the libraries' console output (per-step dicts, warnings, loading bars) as it is."},
    )


@dataclass
class RLArguments(KochatArguments):
    """What the RL recipes (PPO, RLOO/GRPO) add: prompts, and the held-out comparison with the SFT policy."""

    dataset_name: str = field(default="bundled:ppo", metadata={"help": "Prompts (any layout with a prompt)."})
    kl_bound: float | None = field(
        default=None, metadata={"help": "Held-out KL the run must stay under; reported as kl_within_bound."}
    )
    eval_prompts: int = field(default=64, metadata={"help": "Held-out prompts for reward before/after training."})
    eval_samples_per_prompt: int = field(
        default=1, metadata={"help": "Answers sampled per held-out prompt (a rare bad sample moves one less)."}
    )


def parse_recipe_args(parser: Any, argv: Sequence[str] | None = None) -> tuple:
    """`TrlParser.parse_args_and_config`, with config mistakes turned into one-line errors.

    TrlParser takes YAML values as argparse defaults: strings are converted and fail with the whole
    usage text, other values (a list for a float, 1.5 for an int, an unknown choice) pass unchecked.
    Both are checked here and named by file and key.
    """
    from kochat_trl.ranges import check_ranges

    args = list(sys.argv[1:] if argv is None else argv)
    config_path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    config = _read_yaml_config(config_path) if config_path else {}
    actions = {action.dest: action for action in parser._actions}
    _check_config_values(config, actions, config_path)
    check_ranges(parser, config, config_path, args)  # before the dataclasses: some crash on such values
    on_command_line = {arg[2:].split("=")[0].replace("-", "_") for arg in args if arg.startswith("--")}

    def one_line_error(message: str) -> None:  # replaces argparse's usage dump + exit
        if not message.startswith("argument --"):
            raise ConfigError(message)
        option, _, problem = message.removeprefix("argument ").partition(": ")
        key = option.split("/")[0].removeprefix("--").replace("-", "_")
        if key in config and key not in on_command_line:
            raise ConfigError(f"{config_path}: {key}: {problem}")
        raise ConfigError(f"--{key}: {problem}")

    parser.error = one_line_error
    parser.allow_abbrev = False  # argparse would silently take a typo such as --learning_rat for --learning_rate
    try:
        parsed = parser.parse_args_and_config(args)
    except (ValueError, TypeError) as error:
        text = str(error).replace("\n", " ")
        if "8 bit and 4 bit" in text:  # trl's ModelConfig names neither flag
            raise ConfigError("load_in_8bit and load_in_4bit are both set; choose one") from None
        if "arguments are not used" in text:  # HfArgumentParser's wording for unknown command-line options
            unknown = [name.replace("-", "_") for name in re.findall(r"'--([\w-]+)'", text)]
            raise ConfigError(f"unknown option(s) {_with_suggestions(unknown, actions)}") from None
        where = f"{config_path}: " if config_path else ""
        raise ConfigError(f"{where}{text}") from None
    # trl 1.x keeps trust_remote_code on the trainer configs (SFT, RM, RLOO, GRPO), not on ModelConfig,
    # which is what the loaders read: hand it over so the YAML setting is not silently ignored.
    trust_remote_code = any(getattr(part, "trust_remote_code", False) for part in parsed)
    for part in parsed:
        if hasattr(part, "model_name_or_path"):
            part.trust_remote_code = trust_remote_code or getattr(part, "trust_remote_code", False)
    return parsed


def _read_yaml_config(config_path: str) -> dict[str, Any]:
    import yaml

    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"{config_path}: config file not found")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{config_path}: {where}invalid YAML ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: must be a YAML mapping of setting: value")
    return config


def _with_suggestions(names: Sequence[str], actions: dict[str, Any]) -> str:
    import difflib

    parts = []
    for name in names:
        close = difflib.get_close_matches(name, list(actions), n=1)
        parts.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return ", ".join(parts)


def _check_config_values(config: dict[str, Any], actions: dict[str, Any], config_path: str | None) -> None:
    """Unknown keys, wrong types and values outside a field's choices in the YAML config."""
    unknown = [key for key in config if key not in actions and key != "env"]
    if unknown:
        raise ConfigError(f"{config_path}: unknown key(s) {_with_suggestions(unknown, actions)}; fix or remove them")
    expected = {"int": "an integer", "float": "a number", "string_to_bool": "true or false"}  # by argparse type
    for key, value in config.items():
        action = actions.get(key)
        if action is None or value is None:
            continue
        kind = getattr(action.type, "__name__", None)  # HfArgumentParser's (and TRL's copy's) string_to_bool
        many = action.nargs in ("+", "*")
        if isinstance(value, (list, dict)) and not many and kind in expected:
            raise ConfigError(f"{config_path}: {key}: expected {expected[kind]}, got {value!r}")
        for item in value if many and isinstance(value, list) else [value]:
            wrong_type = (
                (kind == "int" and (not isinstance(item, int) or isinstance(item, bool)))
                or (kind == "float" and (not isinstance(item, (int, float)) or isinstance(item, bool)))
                or (kind == "string_to_bool" and not isinstance(item, bool))
            )
            if wrong_type and not isinstance(item, str):  # strings are converted (and checked) by argparse
                raise ConfigError(f"{config_path}: {key}: expected {expected[kind]}, got {item!r}")
            if action.choices and str(item) not in {str(choice) for choice in action.choices}:
                choices = ", ".join(str(choice) for choice in action.choices)
                raise ConfigError(f"{config_path}: {key}: {item!r} is not one of {choices}")


@contextmanager
def user_errors():
    """Recipes' entry points: a `KochatError` prints one line and exits 2, no traceback; an interrupt
    (SIGINT/SIGTERM, after the checkpoint is saved; or a second Ctrl-C, at once) prints one line and exits
    128 + signal."""
    from kochat_trl.resume import StoppedAtOnce, TrainingInterrupted

    try:
        yield
    except KochatError as error:
        print_error_line(f"error: {error}")
        sys.exit(EXIT_USER_ERROR)
    except (TrainingInterrupted, StoppedAtOnce) as error:
        print_error_line(f"stopped: {error}")
        sys.exit(error.exit_code)
    except KeyboardInterrupt:  # outside training: nothing to save, and the stage is not marked finished
        print_error_line(
            "stopped: interrupted by SIGINT before training started or after it ended; rerun to finish the stage"
        )
        sys.exit(128 + 2)


def run_recipe(make_parser: Callable[[], Any], main: Callable[..., Any], argv: Sequence[str] | None = None) -> None:
    from kochat_trl.console import quiet_libraries

    args = list(sys.argv[1:] if argv is None else argv)
    quiet_libraries(verbose_requested(args))  # before parsing: building TRL's config already warns
    with user_errors():
        main(*parse_recipe_args(make_parser(), args))


def verbose_requested(args: Sequence[str]) -> bool:
    """`--verbose` / `--verbose true` on the command line, else `verbose: true` in the --config file."""
    for index, arg in enumerate(args):
        if arg == "--verbose":
            value = args[index + 1] if index + 1 < len(args) and not args[index + 1].startswith("--") else "true"
            return value.lower() in ("true", "1", "yes")
        if arg.startswith("--verbose="):
            return arg.split("=", 1)[1].lower() in ("true", "1", "yes")
    if "--config" in args[:-1]:
        try:
            config = _read_yaml_config(args[list(args).index("--config") + 1])
        except ConfigError:
            return False  # the recipe's parsing reports the unreadable config
        return config.get("verbose") is True
    return False


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def resume_checkpoint(training_args: Any) -> str | None:
    """`resume_from_checkpoint`: a path, or true/last for the newest complete checkpoint in output_dir."""
    from kochat_trl.resume import is_complete_checkpoint, last_complete_checkpoint

    value = training_args.resume_from_checkpoint
    if value is None or value is False or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in ("true", "last"):
        last = last_complete_checkpoint(training_args.output_dir)
        if last is None:
            raise ConfigError(
                f"{training_args.output_dir}: no complete checkpoint-* folder to resume from; "
                "drop --resume_from_checkpoint to start from the beginning"
            )
        return str(last)
    if not Path(value).is_dir():
        raise ConfigError(f"{value}: resume_from_checkpoint is not a checkpoint folder")
    if not is_complete_checkpoint(value):
        raise ConfigError(
            f"{value}: checkpoint is incomplete (its save was cut short: no trainer_state.json); "
            "resume from an earlier checkpoint"
        )
    return str(value)


def parameter_sharding(training_args: Any) -> str | None:
    """The launcher's parameter sharding across processes ("FSDP" or "DeepSpeed ZeRO-3"), or None."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from kochat_trl.engines import requested_engine

    if requested_engine() == "FSDP" or getattr(training_args, "fsdp", None):
        return "FSDP"
    zero3_launch = requested_engine() == "DEEPSPEED" and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    return "DeepSpeed ZeRO-3" if zero3_launch or is_deepspeed_zero3_enabled() else None


def prepare_run(kochat_args: KochatArguments, training_args: Any, model_args: Any, stage: str | None = None) -> None:
    """Validate everything (`validate_run`), then build the tiny model if asked and clear output_dir for
    --overwrite: nothing is loaded, deleted or written before every check passed."""
    from accelerate import PartialState
    from transformers import set_seed

    validate_run(kochat_args, training_args, model_args, stage)
    resuming = resume_checkpoint(training_args) is not None
    output_dir = Path(training_args.output_dir)
    # Seed before any model is built: a new reward/value head is drawn from the global generator
    # when the model loads, before the Trainer seeds anything (same seed -> same run).
    set_seed(training_args.seed)
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            if output_dir.is_dir() and not resuming and kochat_args.overwrite:
                shutil.rmtree(output_dir)
            if kochat_args.init_tiny:
                from kochat_trl.tiny import ensure_tiny

                ensure_tiny(model_args.model_name_or_path, seed=training_args.seed)


def validate_run(kochat_args: KochatArguments, training_args: Any, model_args: Any, stage: str | None = None) -> None:
    """Every check that needs no model weights: settings, paths, output_dir, context lengths and, when
    `stage` (sft, rm or ppo) is given, the data read in that stage's layout. One-line `KochatError`s."""
    from kochat_trl.templates import check_template_name

    try:
        check_template_name(kochat_args.template)  # unknown names fail here, before any model is loaded
    except ConfigError as error:
        raise ConfigError(f"template: {error}") from None
    _check_settings(kochat_args, training_args, model_args)
    _check_output_dir(kochat_args, training_args)
    check_model_path("model_name_or_path", model_args.model_name_or_path, kochat_args.init_tiny)
    context = model_context_length(model_args.model_name_or_path)
    max_length = getattr(training_args, "max_length", None)
    if context and max_length and max_length > context:
        raise ConfigError(
            f"max_length {max_length} exceeds the context of {model_args.model_name_or_path} "
            f"({context} positions in config.json); set max_length <= {context}"
        )
    if stage is None:
        return
    rows = _check_data(kochat_args, stage)
    if stage == "ppo" and kochat_args.eval_fraction == 0:
        raise ConfigError(
            "PPO, RLOO and GRPO score the policy on held-out prompts before and after training; set eval_fraction > 0"
        )
    if stage == "ppo" and hasattr(training_args, "num_mini_batches"):  # TRL's PPOConfig (not RLOO/GRPO's configs)
        _check_ppo(kochat_args, training_args, model_args, rows, context)
    if stage == "ppo":
        from kochat_trl.shared_base import check_settings as check_shared_base

        check_shared_base(kochat_args, training_args, model_args)


def _check_settings(kochat_args: KochatArguments, training_args: Any, model_args: Any) -> None:
    # Numeric ranges were checked on the user's values before parsing (kochat_trl.ranges).
    if model_args.load_in_8bit and model_args.load_in_4bit:
        raise ConfigError("load_in_8bit and load_in_4bit are both set; choose one")
    if kochat_args.overwrite and resume_requested(training_args):
        raise ConfigError(
            "overwrite and resume_from_checkpoint are both set; overwrite deletes the checkpoints, choose one"
        )
    sharding = parameter_sharding(training_args)
    if sharding and (model_args.load_in_8bit or model_args.load_in_4bit):
        # Caught here because the libraries' own errors name neither flag: ZeRO-3 fails in from_pretrained with
        # "DeepSpeed Zero-3 is not compatible with passing a `device_map`" (k-bit loads one whole model per GPU);
        # FSDP with "Must flatten tensors with uniform dtype ... torch.uint8/int8" (bnb stores integer weights).
        flag = "load_in_8bit" if model_args.load_in_8bit else "load_in_4bit"
        raise ConfigError(
            f"{flag} does not combine with {sharding}; for (Q)LoRA launch with accelerate_configs/multi_gpu.yaml "
            f"(DDP), or set {flag}: false to shard the full model"
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        # Without a GPU the processes never join one group: each would train alone and write the same output_dir.
        raise ConfigError(
            f"launched {launched} processes but they did not form one process group (no GPU found); "
            "pass --use_cpu true to train them together on CPU, or launch a single process"
        )
    if sharding == "FSDP" and not _gpu_available(training_args):
        from kochat_trl.engines import FSDP_NEEDS_GPUS

        raise ConfigError(FSDP_NEEDS_GPUS)
    if not model_args.model_name_or_path:
        raise ConfigError("model_name_or_path is not set; give a hub id or a local model folder")


def _gpu_available(training_args: Any) -> bool:
    import torch

    return not getattr(training_args, "use_cpu", False) and torch.cuda.is_available()


def resume_requested(training_args: Any) -> bool:
    value = training_args.resume_from_checkpoint
    return value not in (None, False) and str(value).lower() not in ("", "false", "none")


def _check_output_dir(kochat_args: KochatArguments, training_args: Any) -> None:
    # Every process checks (same filesystem), so a refusal never leaves the others waiting at a barrier.
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"{output_dir}: output_dir exists and is not a folder; choose another output_dir")
    resuming = resume_checkpoint(training_args) is not None
    if resuming and stage_finished(output_dir):
        raise ConfigError(
            f"{output_dir}: the stage already finished ({METRICS_FILE} exists); nothing to resume. "
            "Pass --overwrite true instead of --resume_from_checkpoint to train it again"
        )
    if output_dir.is_dir() and any(output_dir.iterdir()) and not resuming and not kochat_args.overwrite:
        raise ConfigError(
            f"{output_dir}: output_dir is not empty; pass --overwrite true to replace it, "
            "or --resume_from_checkpoint last to continue"
        )
    existing = next(parent for parent in (output_dir, *output_dir.absolute().parents) if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{output_dir}: cannot write under {existing}; choose a writable output_dir")


def check_model_path(name: str, path: str | None, will_build: bool = False) -> None:
    """A local folder that exists, or something shaped like a hub id (org/name) that is not a local path."""
    if not path or will_build or Path(path).exists():
        return
    first = path.split("/")[0]
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path) or Path(first).is_dir():
        hint = "; set init_tiny: true to build the embedded default there" if name == "model_name_or_path" else ""
        raise ConfigError(f"{path}: {name} is neither an existing folder nor a hub id (org/name){hint}")


def model_context_length(path: str | os.PathLike | None) -> int | None:
    """Positions the model at `path` (a local folder, or a LoRA adapter folder: its base) can attend to,
    read from config.json; None when unknown (a hub id, or a config without such a field)."""
    folder = Path(path) if path else None
    if folder is not None and not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        folder = Path(base) if base else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    keys = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
    return next((config[key] for key in keys if isinstance(config.get(key), int)), None)


def _split_sizes(rows: int, eval_fraction: float) -> tuple[int, int]:
    """(train, eval) row counts, as `kochat_trl.data.to_dataset_dict` splits."""
    if eval_fraction == 0:
        return rows, 0
    held_out = min(max(round(rows * eval_fraction), 1), rows - 1)
    return rows - held_out, held_out


def _check_data(kochat_args: KochatArguments, stage: str) -> list[dict[str, Any]]:
    from kochat_trl.data import load_stage_data

    rows = load_stage_data(kochat_args.dataset_name, stage).rows[: kochat_args.max_samples]
    if kochat_args.eval_fraction > 0 and len(rows) < 2:
        raise DataError(
            f"{kochat_args.dataset_name}: {len(rows)} usable row(s) cannot be split into train and eval; "
            "add data or set eval_fraction: 0"
        )
    return rows


def _check_ppo(
    kochat_args: Any, training_args: Any, model_args: Any, rows: list[dict[str, Any]], context: int | None
) -> None:
    from kochat_trl.engines import check_ppo_checkpoints

    check_ppo_checkpoints(training_args)
    local_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    minibatches = training_args.num_mini_batches
    if minibatches < 1 or local_batch % minibatches:
        raise ConfigError(
            f"per_device_train_batch_size x gradient_accumulation_steps = {local_batch} is not divisible "
            f"by num_mini_batches {minibatches}; PPO splits every rollout batch into that many "
            "minibatches"
        )
    if training_args.whiten_rewards and local_batch // minibatches < 8:
        raise ConfigError(
            f"whiten_rewards needs minibatches of at least 8 rollouts, got {local_batch // minibatches}; "
            "raise per_device_train_batch_size or set whiten_rewards: false"
        )
    if training_args.stop_token and training_args.stop_token_id is not None:
        raise ConfigError("stop_token and stop_token_id are both set; choose one")
    train_rows, _ = _split_sizes(len(rows), kochat_args.eval_fraction)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if train_rows < local_batch * world:
        # TRL's loader drops incomplete batches: with none left its loop would wait forever.
        raise DataError(
            f"{kochat_args.dataset_name}: {train_rows} training prompts, fewer than one rollout batch "
            f"({local_batch * world}); add prompts or lower per_device_train_batch_size"
        )
    check_model_path("reward_model_path", training_args.reward_model_path)
    check_model_path("value_model_path", getattr(kochat_args, "value_model_path", None))
    if context is None or not Path(model_args.model_name_or_path).is_dir():
        return
    from kochat_trl.modeling import load_tokenizer
    from kochat_trl.templates import prompt_ids, saved_template_name

    tokenizer = load_tokenizer(model_args, padding_side="left", template=kochat_args.template, announce=False)
    longest = max(len(prompt_ids(tokenizer, row["prompt"])) for row in rows)
    if longest + training_args.response_length > context:
        raise ConfigError(
            f"longest prompt ({longest} tokens with template {saved_template_name(tokenizer)}) + "
            f"response_length {training_args.response_length} exceeds the context of "
            f"{model_args.model_name_or_path} "
            f"({context} positions); lower response_length to {context - longest} or "
            "drop the longest prompts"
        )


def resolved_config(*argument_groups: Any) -> dict[str, Any]:
    """All settings a run used, as one flat mapping (tokens never included)."""
    config: dict[str, Any] = {}
    for group in argument_groups:
        for item in dataclasses.fields(group):
            value = getattr(group, item.name)
            if "token" in item.name and "hub" in item.name:
                continue
            # A JSON round trip turns enums (str subclasses) and other objects into plain YAML-able values.
            config[item.name] = json.loads(json.dumps(value, default=str))
    return config


def finish_run(
    output_dir: str | Path,
    metrics: dict[str, Any],
    config: dict[str, Any],
    log_history: list[dict[str, Any]],
    curve_keys: Sequence[str],
) -> Path:
    """Write config.yaml, curves.png and, last, metrics.json (main process only)."""
    import yaml

    from kochat_trl.reporting import plot_curves

    output_dir = Path(output_dir)
    if not is_main_process():
        return output_dir / METRICS_FILE
    # Trainer.save_model pickles the arguments; loading a pickle runs code, and config.yaml says the same.
    (output_dir / "training_args.bin").unlink(missing_ok=True)
    write_text_atomic(yaml.safe_dump(config, allow_unicode=True, sort_keys=True), output_dir / "config.yaml")
    write_json_atomic(log_history, output_dir / "log_history.json")
    plot_curves(log_history, curve_keys, output_dir / "curves.png")
    return write_json_atomic(metrics, output_dir / METRICS_FILE)


def read_json(path: str | Path) -> Any:
    """The JSON in `path`, or None when the file is not there."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def last_logged(log_history: list[dict[str, Any]], key: str) -> Any:
    """The most recent value of `key` in a trainer's log history (None if never logged)."""
    return next((entry[key] for entry in reversed(log_history) if key in entry), None)


def stage_finished(output_dir: str | Path) -> bool:
    return (Path(output_dir) / METRICS_FILE).is_file()
