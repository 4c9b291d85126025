"""What every recipe does around its trainer: parse the config, prepare the run folder, finish it.

A recipe reads like TRL's own scripts (`TrlParser` → dataclasses → trainer → train → save); the
steps all of them share live here once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kochat_trl.errors import EXIT_USER_ERROR, ConfigError, KochatError
from kochat_trl.outputs import write_json_atomic, write_text_atomic

METRICS_FILE = "metrics.json"  # written last: its presence means the stage finished


@dataclass
class KochatArguments:
    """Data and run settings shared by the kochat-trl recipes (TRL's ScriptArguments, Korean data)."""

    dataset_name: str = field(
        default="bundled:sft",
        metadata={"help": "Data file (any supported layout), bundled:sft|rm|ppo, or a hub dataset id."},
    )
    template: str = field(
        default="kochatgpt",
        metadata={"help": "Prompt template: kochatgpt, kochatgpt_short, koalpaca, kullm or chat."},
    )
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of rows held out for evaluation."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows (quick trials)."})
    init_tiny: bool = field(
        default=False,
        metadata={"help": "Build the embedded tiny model at model_name_or_path first if it is not there."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


def parse_recipe_args(parser: Any, argv: Sequence[str] | None = None) -> tuple:
    """`TrlParser.parse_args_and_config`, with config mistakes turned into one-line errors."""
    args = list(sys.argv[1:] if argv is None else argv)
    config_path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    if config_path and not Path(config_path).is_file():
        raise ConfigError(f"{config_path}: config file not found")
    try:
        return parser.parse_args_and_config(args)
    except (ValueError, TypeError) as error:
        where = f"{config_path}: " if config_path else ""
        raise ConfigError(f"{where}{error}".replace("\n", " ")) from None


@contextmanager
def user_errors():
    """Recipes' entry points: a `KochatError` prints one line and exits 2, no traceback."""
    try:
        yield
    except KochatError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def run_recipe(make_parser: Callable[[], Any], main: Callable[..., Any], argv: Sequence[str] | None = None) -> None:
    with user_errors():
        main(*parse_recipe_args(make_parser(), argv))


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def resume_checkpoint(training_args: Any) -> str | bool | None:
    """`resume_from_checkpoint`: a path, or true/last for the newest checkpoint in output_dir."""
    value = training_args.resume_from_checkpoint
    if value is None or value is False:
        return None
    if str(value).lower() in ("true", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
        if last is None:
            raise ConfigError(f"{training_args.output_dir}: no checkpoint-* folder to resume from")
        return last
    if not Path(value).is_dir():
        raise ConfigError(f"{value}: resume_from_checkpoint is not a checkpoint folder")
    return str(value)


def parameter_sharding(training_args: Any) -> str | None:
    """The launcher's parameter sharding across processes ("FSDP" or "DeepSpeed ZeRO-3"), or None."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or getattr(training_args, "fsdp", None):
        return "FSDP"
    zero3_launch = (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    )
    return "DeepSpeed ZeRO-3" if zero3_launch or is_deepspeed_zero3_enabled() else None


def prepare_run(kochat_args: KochatArguments, training_args: Any, model_args: Any) -> None:
    """Validate settings, build the tiny model if asked, and make sure output_dir may be written."""
    from accelerate import PartialState

    from kochat_trl.templates import get_template

    get_template(kochat_args.template)  # unknown names fail here, before any model is loaded
    if not 0 <= kochat_args.eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {kochat_args.eval_fraction}")
    if model_args.load_in_8bit and model_args.load_in_4bit:
        raise ConfigError("load_in_8bit and load_in_4bit are both set; choose one")
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
    if not model_args.model_name_or_path:
        raise ConfigError("model_name_or_path is not set; give a hub id or a local model folder")
    output_dir = Path(training_args.output_dir)
    resuming = resume_checkpoint(training_args) is not None
    # Every process checks (same filesystem), so a refusal never leaves the others waiting at a barrier.
    if output_dir.is_dir() and any(output_dir.iterdir()) and not resuming and not kochat_args.overwrite:
        raise ConfigError(
            f"{output_dir}: output_dir is not empty; pass --overwrite true to replace it, "
            "or --resume_from_checkpoint last to continue"
        )
    if not kochat_args.init_tiny and not Path(model_args.model_name_or_path).exists():
        if "/" not in model_args.model_name_or_path:
            raise ConfigError(
                f"{model_args.model_name_or_path}: model_name_or_path is neither a folder nor a hub id; "
                "set init_tiny: true to build the embedded default there"
            )
    # Seed before any model is built: a new reward/value head is drawn from the global generator
    # when the model loads, before the Trainer seeds anything (same seed -> same run).
    from transformers import set_seed

    set_seed(training_args.seed)
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            if output_dir.is_dir() and not resuming and kochat_args.overwrite:
                shutil.rmtree(output_dir)
            if kochat_args.init_tiny:
                from kochat_trl.tiny import ensure_tiny

                ensure_tiny(model_args.model_name_or_path, seed=training_args.seed)


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


def finish_run(output_dir: str | Path, metrics: dict[str, Any], config: dict[str, Any],
               log_history: list[dict[str, Any]], curve_keys: Sequence[str]) -> Path:  # fmt: skip
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
