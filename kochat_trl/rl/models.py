"""The RL stages' models: separate reward (and value) copies or adapters on one shared base, and where they sit.

PPO has a policy, reward and value model; RLOO and GRPO a policy and a reward model. The reference is never a copy:
under LoRA it is the policy with its adapter(s) off. With `shared_base: true` (`kochat_trl.models.shared_base`) the
reward and value models are adapters on the policy's frozen base too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kochat_trl.models import loading, lora
from kochat_trl.models.shared_base import SharedBase


@dataclass
class RLModels:
    policy: Any
    reward: Any
    value: Any  # None for RLOO/GRPO
    policy_lora: Any  # the LoRA config TRL wraps the policy with; None when the policy is already a PEFT model
    shared: SharedBase | None = None


def load_ppo_models(script_args: Any, training_args: Any, model_args: Any, tokenizer: Any) -> RLModels:
    """PPO: the policy (SFT model), the frozen reward model and the value model to train, as the config asks."""
    return _load(script_args, training_args, model_args, tokenizer, training_args.reward_model_path, with_value=True)


def load_critic_free_models(script_args: Any, training_args: Any, model_args: Any, tokenizer: Any) -> RLModels:
    """RLOO/GRPO: the policy (SFT model) and the frozen reward model (`script_args.reward_model_path`)."""
    return _load(script_args, training_args, model_args, tokenizer, script_args.reward_model_path, with_value=False)


def _load(
    script_args: Any, training_args: Any, model_args: Any, tokenizer: Any, reward_path: str, with_value: bool
) -> RLModels:
    gradient_checkpointing = training_args.gradient_checkpointing
    with _loading_draws_nothing():
        policy = loading.load_causal_lm(model_args, tokenizer, gradient_checkpointing)
    policy_lora = lora.build_peft_config(model_args, policy, "CAUSAL_LM")
    if getattr(script_args, "shared_base", False):
        from kochat_trl.models import shared_base

        shared = shared_base.build(policy, policy_lora, reward_path, tokenizer, gradient_checkpointing, with_value)
        return RLModels(shared.policy, shared.reward, shared.value, None, shared)
    with _loading_draws_nothing():
        reward = loading.load_reward_model(loading.at_path(model_args, reward_path), tokenizer)
    value = None
    if with_value:
        value_path = getattr(script_args, "value_model_path", None) or reward_path
        value = _value_model(model_args, value_path, tokenizer, gradient_checkpointing)
    return RLModels(policy, reward, value, policy_lora)


@contextmanager
def _loading_draws_nothing() -> Iterator[None]:
    """Loading a finished model draws nothing from the global generator on one process or under DDP; under ZeRO-3
    (zero.Init) transformers initialises every weight before loading it and draws. Inside, the draws come from a
    forked generator, so the value model's new LoRA (drawn next) starts the same under every engine."""
    import torch

    # This process's GPU only: forking every visible one would open a CUDA context on each, from every rank.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        yield


def _value_model(model_args: Any, path: str, tokenizer: Any, gradient_checkpointing: bool) -> Any:
    """Initialised from the reward model. From a LoRA reward adapter, that adapter itself trains on (as under
    shared_base: the same maths, on a copy of the base); from a full model, a new LoRA on it when use_peft."""
    if model_args.use_peft and loading.adapter_base(path) is not None:
        from peft import PeftModel

        base_args = loading.at_path(model_args, loading.adapter_base(path))
        with _loading_draws_nothing():
            base = loading.load_reward_model(base_args, tokenizer, 1, gradient_checkpointing)
        return PeftModel.from_pretrained(base, path, is_trainable=True)
    with _loading_draws_nothing():
        value = loading.load_reward_model(loading.at_path(model_args, path), tokenizer, 1, gradient_checkpointing)
    if model_args.use_peft:
        from peft import get_peft_model

        value = get_peft_model(value, lora.build_peft_config(model_args, value, "SEQ_CLS"))
    return value


def parameter_counts(models: RLModels, trained_policy: Any, separate_reference: bool) -> dict[str, Any]:
    """What each role costs in parameters. The reference shares the policy's weights under LoRA; under
    shared_base the reward and value models add only their adapters and heads to the one base."""
    if models.shared is not None:
        counts = models.shared.parameter_counts()
        return {
            "policy": counts["base"] + counts["policy_adapter"],
            "policy_trainable": counts["policy_adapter"],
            "reference_extra": 0,
            "reward": counts["reward_adapter"] + counts["reward_head"],
            "value": counts["value_adapter"] + counts["value_head"],
            "value_trainable": counts["value_adapter"] + counts["value_head"],
            "shared_base": True,
        }
    policy_trainable, policy_total = loading.trainable_parameter_share(trained_policy)
    value_trainable, value_total = loading.trainable_parameter_share(models.value)
    return {
        "policy": policy_total,
        "policy_trainable": policy_trainable,
        "reference_extra": policy_total if separate_reference else 0,
        "reward": sum(parameter.numel() for parameter in models.reward.parameters()),
        "value": value_total,
        "value_trainable": value_trainable,
        "shared_base": False,
    }


def critic_free_parameter_counts(models: RLModels, trained_policy: Any) -> dict[str, Any]:
    """RLOO/GRPO: the policy's parameters and what the reward model adds (its adapter and head under shared_base)."""
    policy_trainable, policy_total = loading.trainable_parameter_share(trained_policy)
    if models.shared is not None:
        counts = models.shared.parameter_counts()
        reward = counts["reward_adapter"] + counts["reward_head"]
    else:
        reward = sum(parameter.numel() for parameter in models.reward.parameters())
    return {
        "policy": policy_total,
        "policy_trainable": policy_trainable,
        "reward": reward,
        "shared_base": models.shared is not None,
    }


def place_on(model: Any, device: Any) -> Any:
    """`model` on `device`; k-bit models stay where they were loaded (device_map) since they cannot move."""
    return model if getattr(model, "hf_device_map", None) else model.to(device)
