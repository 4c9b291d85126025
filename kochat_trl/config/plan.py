"""A run's checked plan: the settings read once, every rule checked, and what the run then does (resume, engine, paths).

The recipes call `check_run` (through `kochat_trl.recipes.steps.prepare_run`) before anything loads and carry the
plan it returns downward: the checkpoint to continue from is resolved here once, not again by each stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kochat_trl.config import checks, rl_checks
from kochat_trl.config.arguments import KochatArguments
from kochat_trl.run.engines import parameter_sharding, requested_engine


@dataclass(frozen=True)
class RunPlan:
    """What a recipe's run does, decided before any model loads."""

    stage: str | None  # the data layout the rows were read in (sft, rm, ppo), or None (not read)
    output_dir: Path
    resume_from: str | None  # the checkpoint folder to continue from, or None: train from the start
    engine: str | None  # the engine `accelerate launch` was asked for (DEEPSPEED, FSDP), or None: DDP / one process
    sharding: str | None  # "FSDP" or "DeepSpeed ZeRO-3" when parameters are sharded across processes
    context: int | None  # positions the model can attend to (its config.json), None when unknown
    rows: int | None  # usable data rows in the stage's layout (after max_samples), None when not read


def check_run(kochat_args: KochatArguments, training_args: Any, model_args: Any, stage: str | None = None) -> RunPlan:
    """Every check that needs no model weights: settings, paths, output_dir, context lengths and, when `stage`
    (sft, rm or ppo) is given, the data read in that stage's layout, with the RL stages' rules for ppo. One-line
    `KochatError`s, in the order a person fixes them; the plan when all pass."""
    engine = requested_engine()
    sharding = parameter_sharding(training_args, engine)
    checks.check_settings(kochat_args, training_args, model_args, sharding)
    resume_from = checks.check_output_dir(kochat_args, training_args)
    context = checks.check_model(kochat_args, training_args, model_args)
    rows = checks.check_data(kochat_args, stage) if stage is not None else None
    if stage == "ppo":
        rl_checks.validate_rl(kochat_args, training_args, model_args, rows, context, engine)
    return RunPlan(
        stage=stage,
        output_dir=Path(training_args.output_dir),
        resume_from=resume_from,
        engine=engine,
        sharding=sharding,
        context=context,
        rows=None if rows is None else len(rows),
    )
