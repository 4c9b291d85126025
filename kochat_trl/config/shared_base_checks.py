"""The `shared_base: true` settings checks, one rule each, run before anything loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kochat_trl.errors import ConfigError
from kochat_trl.models.shared_base import ADAPTER_CONFIG


def check_settings(script_args: Any, training_args: Any, model_args: Any, engine: str | None) -> None:
    """shared_base: true needs LoRA, stage 2 as a LoRA adapter trained on this very SFT model, no separate value
    model, and DDP or one process (`engine`: the launcher's, `kochat_trl.run.engines.requested_engine`)."""
    if not getattr(script_args, "shared_base", False):
        return
    # PPOConfig holds the reward model's path; the RLOO/GRPO recipe's own arguments do.
    reward_path = getattr(training_args, "reward_model_path", None) or getattr(script_args, "reward_model_path", None)
    _verify_lora(model_args)
    _verify_reward_adapter(reward_path)
    _verify_same_base(reward_path, model_args.model_name_or_path)
    _verify_no_value_model_path(script_args)
    _verify_engine(engine)


def _verify_lora(model_args: Any) -> None:
    if not model_args.use_peft:
        raise ConfigError(
            "shared_base: true trains the policy and value model as LoRA adapters on one frozen base; "
            "set use_peft: true, or shared_base: false for full models"
        )


def _verify_reward_adapter(path: str | None) -> None:
    from kochat_trl.models.loading import adapter_base

    if not path or adapter_base(path) is None:
        raise ConfigError(
            f"reward_model_path {path}: shared_base: true needs the reward model as a LoRA adapter "
            "folder (adapter_config.json); train stage 2 with use_peft: true "
            "(recipes/configs/tiny/reward_lora.yaml), or set shared_base: false"
        )
    task = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("task_type")
    if task != "SEQ_CLS":
        raise ConfigError(
            f"{Path(path) / ADAPTER_CONFIG}: task_type {task!r} is not a reward model "
            "adapter (SEQ_CLS); point reward_model_path at stage 2's output"
        )


def _verify_same_base(reward_adapter: str, model_name_or_path: str) -> None:
    from kochat_trl.models.loading import adapter_base

    base = adapter_base(reward_adapter)
    same = base == model_name_or_path or (
        Path(base).exists() and Path(base).resolve() == Path(model_name_or_path).resolve()
    )
    if not same:
        raise ConfigError(
            f"{Path(reward_adapter) / ADAPTER_CONFIG}: the reward adapter was trained on {base}, not on "
            f"the policy {model_name_or_path}; shared_base needs one base for both (train stage 2 "
            f"from {model_name_or_path}, or set shared_base: false)"
        )


def _verify_no_value_model_path(script_args: Any) -> None:
    if getattr(script_args, "value_model_path", None):
        raise ConfigError(
            "value_model_path is set with shared_base: true; the value model is the reward adapter "
            "trained further on the shared base: drop value_model_path"
        )


def _verify_engine(engine: str | None) -> None:
    if engine:
        raise ConfigError(
            f"shared_base: true runs under DDP or one process, not {engine} (the reward and value "
            "models would be separate engines over the policy's weights); launch with "
            "accelerate_configs/multi_gpu.yaml or cpu_multiprocess.yaml"
        )
