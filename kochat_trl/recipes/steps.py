"""A recipe's run from start to end: parse and check, prepare the run folder, finish it with its metrics.

A recipe reads like TRL's own scripts (`TrlParser` → dataclasses → trainer → train → save); the
steps all of them share live here once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from kochat_trl.config.arguments import KochatArguments
from kochat_trl.config.parsing import parse_recipe_args, verbose_requested
from kochat_trl.config.plan import RunPlan, check_run
from kochat_trl.errors import EXIT_USER_ERROR, KochatError, print_error_line
from kochat_trl.run.disk import writing_to
from kochat_trl.run.outputs import METRICS_FILE, remove_tree, write_json_atomic, write_text_atomic


@contextmanager
def user_errors():
    """Recipes' entry points: a `KochatError` prints one line and exits 2, no traceback; an interrupt
    (SIGINT/SIGTERM, after the checkpoint is saved; or a second Ctrl-C, at once) prints one line and exits
    128 + signal."""
    from kochat_trl.run.resume import StoppedAtOnce, TrainingInterrupted

    # Every launched process checks the same settings and data and stops with the same line: one machine's
    # console shows it once (its first process), not once per GPU.
    say = print_error_line if os.environ.get("LOCAL_RANK", "0") == "0" else lambda line: None
    try:
        yield
    except KochatError as error:
        say(f"error: {error}")
        sys.exit(EXIT_USER_ERROR)
    except (TrainingInterrupted, StoppedAtOnce) as error:
        say(f"stopped: {error}")
        sys.exit(error.exit_code)
    except KeyboardInterrupt:  # outside training: nothing to save, and the stage is not marked finished
        say("stopped: interrupted by SIGINT before training started or after it ended; rerun to finish the stage")
        sys.exit(128 + 2)


def run_recipe(make_parser: Callable[[], Any], main: Callable[..., Any], argv: Sequence[str] | None = None) -> None:
    """A recipe's `__main__`: quiet the libraries unless --verbose, parse `argv` (default: the command line), run."""
    from kochat_trl.run.console import quiet_libraries

    args = list(sys.argv[1:] if argv is None else argv)
    quiet_libraries(verbose_requested(args))  # before parsing: building TRL's config already warns
    with user_errors():
        parsed = parse_recipe_args(make_parser(), args)
        output_dir = next((group.output_dir for group in parsed if getattr(group, "output_dir", None)), ".")
        with writing_to(output_dir):  # a full or read-only disk: one line naming the folder, exit 2
            main(*parsed)


class _ChecksPassed(Exception):
    """Raised by prepare_run under `check_recipe`: every check passed, and nothing is to be loaded or written."""


_CHECK_ONLY = ContextVar("check_only", default=False)


def check_recipe(make_parser: Callable[[], Any], main: Callable[..., Any], argv: Sequence[str]) -> tuple[Any, ...]:
    """Parse `argv` and run the recipe's main() up to the end of prepare_run's checks, in this process: the same
    one-line errors a run gives, with nothing loaded or written. Returns the parsed (script, training, model)
    arguments. Each recipe calls prepare_run before it loads anything."""
    from kochat_trl.run.console import quiet_libraries

    quiet_libraries(verbose_requested(argv))
    parsed = parse_recipe_args(make_parser(), list(argv))
    token = _CHECK_ONLY.set(True)
    try:
        main(*parsed)
    except _ChecksPassed:
        return parsed
    finally:
        _CHECK_ONLY.reset(token)
    raise RuntimeError(f"{main.__module__}.main returned without calling prepare_run")


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def prepare_run(kochat_args: KochatArguments, training_args: Any, model_args: Any, stage: str | None = None) -> RunPlan:
    """Check everything into the run's plan (`check_run`), then build the tiny model if asked and clear output_dir
    for --overwrite: nothing is loaded, deleted or written before every check passed. Returns the plan."""
    from accelerate import PartialState
    from transformers import set_seed

    plan = check_run(kochat_args, training_args, model_args, stage)
    if _CHECK_ONLY.get():
        raise _ChecksPassed
    if getattr(training_args, "ddp_find_unused_parameters", False) is None:
        # Every parameter that trains (a full model, LoRA adapters, a score head) is used in every forward of these
        # stages; the Trainer's default for a PEFT model or one without checkpointing, True, costs a traversal of
        # the autograd graph per step and a warning from every rank. A value the user set is kept.
        training_args.ddp_find_unused_parameters = False
    # Seed before any model is built: a new reward/value head is drawn from the global generator
    # when the model loads, before the Trainer seeds anything (same seed -> same run).
    set_seed(training_args.seed)
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            if plan.output_dir.is_dir() and plan.resume_from is None and kochat_args.overwrite:
                remove_tree(plan.output_dir)
            if kochat_args.init_tiny:
                from kochat_trl.models.tiny import ensure_tiny

                ensure_tiny(model_args.model_name_or_path, seed=training_args.seed)
    return plan


def training_callbacks() -> list[Any]:
    """Callbacks every recipe's trainer gets (order matters: the pickle goes before an interrupt raises)."""
    from kochat_trl.models.loading import Float32Adapters
    from kochat_trl.run.resume import InterruptCallback, NoPickleCheckpoints

    return [Float32Adapters(), NoPickleCheckpoints(), InterruptCallback()]


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


def finish_run(trainer: Any, metrics: dict[str, Any], curve_keys: Sequence[str], *argument_groups: Any) -> Path:
    """Write config.yaml (every setting of `argument_groups`: script, training, model arguments), the trainer's log
    history, curves.png and, last, metrics.json into training_args.output_dir (main process only)."""
    import yaml

    from kochat_trl.eval.reporting import plot_curves

    output_dir = Path(trainer.args.output_dir)
    if not is_main_process():
        return output_dir / METRICS_FILE
    log_history = trainer.state.log_history
    # Trainer.save_model pickles the arguments; loading a pickle runs code, and config.yaml says the same.
    (output_dir / "training_args.bin").unlink(missing_ok=True)
    config = resolved_config(*argument_groups)
    write_text_atomic(yaml.safe_dump(config, allow_unicode=True, sort_keys=True), output_dir / "config.yaml")
    write_json_atomic(log_history, output_dir / "log_history.json")
    plot_curves(log_history, curve_keys, output_dir / "curves.png")
    return write_json_atomic(metrics, output_dir / METRICS_FILE)


def last_logged(log_history: list[dict[str, Any]], key: str) -> Any:
    """The most recent value of `key` in a trainer's log history (None if never logged)."""
    return next((entry[key] for entry in reversed(log_history) if key in entry), None)


def train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """The mean training loss over every logged step. Not the Trainer's `train_loss`: that averages only the steps
    of the last `train()` call, so a resumed run reported another number than the same run uninterrupted."""
    total, steps, previous = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            steps += entry["step"] - previous
            previous = entry["step"]
    return total / steps if steps else None


def shared_metrics(trainer: Any, tokenizer: Any) -> dict[str, Any]:
    """The metrics.json keys every stage writes, whatever it trains: steps taken and the template it trained with."""
    from kochat_trl.data.templates import saved_template_name

    return {"global_step": trainer.state.global_step, "template": saved_template_name(tokenizer)}


def parameter_metrics(model: Any, model_args: Any) -> dict[str, Any]:
    """The metrics.json keys of a stage that trains one model (SFT, RM): what it trained, on which base."""
    from kochat_trl.models.loading import trainable_parameter_share

    trainable, total = trainable_parameter_share(model)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "adapter": model_args.use_peft,
        "base_model": model_args.model_name_or_path,
    }
