"""The checks only the RL stages need (PPO, RLOO/GRPO), one rule per `_verify_*` function, run before any load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kochat_trl.config.checks import check_model_path
from kochat_trl.errors import ConfigError, DataError


def validate_rl(
    kochat_args: Any,
    training_args: Any,
    model_args: Any,
    rows: list[dict[str, Any]],
    context: int | None,
    engine: str | None,
) -> None:
    """PPO's, RLOO's and GRPO's rules on top of `kochat_trl.config.checks`; `rows` are the prompts, `context` the
    policy's context length, `engine` the launcher's engine (`kochat_trl.run.engines.requested_engine`)."""
    from kochat_trl.config.shared_base_checks import check_settings as check_shared_base

    _verify_held_out_prompts(kochat_args)
    if hasattr(training_args, "num_mini_batches"):  # TRL's PPOConfig (not RLOO/GRPO's configs)
        check_ppo_checkpoints(training_args, engine)
        _verify_minibatches_divide_the_batch(training_args)
        _verify_whitening_has_enough_rollouts(training_args)
        _verify_one_stop_token(training_args)
        _verify_one_rollout_batch(kochat_args, training_args, rows)
        check_model_path("reward_model_path", training_args.reward_model_path)
        check_model_path("value_model_path", getattr(kochat_args, "value_model_path", None))
        _verify_prompt_and_response_fit(kochat_args, training_args, model_args, rows, context)
    check_shared_base(kochat_args, training_args, model_args, engine)


def check_ppo_checkpoints(training_args: Any, engine: str | None) -> None:
    """PPO under DeepSpeed trains and saves its result, but cannot checkpoint: TRL 1.12's PPOTrainer leaves
    the optimizer to DeepSpeed's own checkpoint format, which our resume does not read, and the value model
    would be written from its ZeRO-3 shards. Refused before anything loads, with the configs that do work."""
    saving = str(getattr(training_args.save_strategy, "value", training_args.save_strategy)) != "no"
    if engine == "DEEPSPEED" and (saving or training_args.resume_from_checkpoint):
        what = "resume_from_checkpoint" if training_args.resume_from_checkpoint else "save_strategy"
        raise ConfigError(
            f"PPO under DeepSpeed cannot checkpoint or resume ({what} is set); set save_strategy: "
            "no to train without checkpoints, or launch with accelerate_configs/multi_gpu.yaml (DDP) "
            "to checkpoint and resume"
        )


def _verify_held_out_prompts(kochat_args: Any) -> None:
    if kochat_args.eval_fraction == 0:
        raise ConfigError(
            "PPO, RLOO and GRPO score the policy on held-out prompts before and after training; set eval_fraction > 0"
        )


def _local_batch(training_args: Any) -> int:
    return training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps


def _verify_minibatches_divide_the_batch(training_args: Any) -> None:
    local_batch, minibatches = _local_batch(training_args), training_args.num_mini_batches
    if minibatches < 1 or local_batch % minibatches:
        raise ConfigError(
            f"per_device_train_batch_size x gradient_accumulation_steps = {local_batch} is not divisible "
            f"by num_mini_batches {minibatches}; PPO splits every rollout batch into that many "
            "minibatches"
        )


def _verify_whitening_has_enough_rollouts(training_args: Any) -> None:
    per_minibatch = _local_batch(training_args) // training_args.num_mini_batches
    if training_args.whiten_rewards and per_minibatch < 8:
        raise ConfigError(
            f"whiten_rewards needs minibatches of at least 8 rollouts, got {per_minibatch}; "
            "raise per_device_train_batch_size or set whiten_rewards: false"
        )


def _verify_one_stop_token(training_args: Any) -> None:
    if training_args.stop_token and training_args.stop_token_id is not None:
        raise ConfigError("stop_token and stop_token_id are both set; choose one")


def split_sizes(rows: int, eval_fraction: float) -> tuple[int, int]:
    """(train, eval) row counts, as `kochat_trl.data.layouts.to_dataset_dict` splits."""
    if eval_fraction == 0:
        return rows, 0
    held_out = min(max(round(rows * eval_fraction), 1), rows - 1)
    return rows - held_out, held_out


def _verify_one_rollout_batch(kochat_args: Any, training_args: Any, rows: list[dict[str, Any]]) -> None:
    train_rows, _ = split_sizes(len(rows), kochat_args.eval_fraction)
    batch = _local_batch(training_args) * int(os.environ.get("WORLD_SIZE", "1"))
    if train_rows < batch:
        # TRL's loader drops incomplete batches: with none left its loop would wait forever.
        raise DataError(
            f"{kochat_args.dataset_name}: {train_rows} training prompts, fewer than one rollout batch "
            f"({batch}); add prompts or lower per_device_train_batch_size"
        )


def _verify_prompt_and_response_fit(
    kochat_args: Any, training_args: Any, model_args: Any, rows: list[dict[str, Any]], context: int | None
) -> None:
    if context is None or not Path(model_args.model_name_or_path).is_dir():
        return
    from kochat_trl.data.templates import prompt_ids, saved_template_name
    from kochat_trl.models.loading import load_tokenizer

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
