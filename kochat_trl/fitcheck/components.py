"""The memory components each training stage holds: a model's training state, references, PPO's models and rollout.

SFT trains a causal LM on batch × seq tokens. RM trains a sequence classifier on chosen and rejected in one
forward (2 × batch sequences). DPO holds the policy and its reference. PPO (trl's PPOTrainer) holds the policy,
the reference (the policy with its adapter disabled under LoRA, else a full frozen copy), the reward model and
the value model (a separate copy of the reward model with its own LoRA adapter, or fully trained without LoRA);
sequences are seq_len (query) + response_length tokens and the rollout batch equals the training batch. Each
component's bytes follow `kochat_trl.fitcheck.memory`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kochat_trl.fitcheck.memory import (
    activation_bytes,
    logits_bytes,
    lora_param_count,
    trainable_params,
    unquantized_bytes,
    weight_bytes,
)
from kochat_trl.fitcheck.settings import DTYPE_BYTES, FitSettings
from kochat_trl.fitcheck.shape import ModelShape, model_shape

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Component:
    """One row of an estimate: the bytes of one kind of tensor and the phase that holds it."""

    key: str
    label: str
    bytes: int
    phase: str  # "static": held the whole step; otherwise the transient phase it belongs to
    formula: str


def _weights_label(settings: FitSettings) -> str:
    if settings.quantization == "8bit":
        return "int8 + fp32 scales, rest fp32"
    if settings.quantization == "4bit":
        return "nf4 + fp32 absmax, rest fp32"
    return settings.dtype


def trainer_components(shape: ModelShape, settings: FitSettings, prefix: str, label: str) -> list[Component]:
    """Weights, adapter, gradients and AdamW states: gradients and each AdamW state have the trainable
    parameter's dtype (torch's zeros_like), so they cost 1x and 2x the trainable bytes."""
    count, trainable = trainable_params(shape, settings)
    if settings.lora:
        adapter_formula = f"{lora_param_count(shape, settings.lora_r):,} LoRA params x 4 B" + (
            f" + score head copy {shape.head_param_count:,} params" if shape.head_param_count else ""
        )
        kind = f"{count:,} trainable (LoRA fp32)"
    else:
        adapter_formula, kind = "none (full fine-tuning)", f"{count:,} trainable x {DTYPE_BYTES[settings.dtype]} B"
    return [
        Component(
            f"{prefix}weights",
            f"{label} weights",
            weight_bytes(shape, settings),
            "static",
            f"{shape.param_count:,} params, {_weights_label(settings)}",
        ),
        Component(
            f"{prefix}adapter", f"{label} LoRA adapter", trainable if settings.lora else 0, "static", adapter_formula
        ),
        Component(f"{prefix}gradients", f"{label} gradients", trainable, "static", kind),
        Component(
            f"{prefix}optimizer",
            f"{label} AdamW states",
            2 * trainable,
            "static",
            "exp_avg + exp_avg_sq, 2 x gradient bytes",
        ),
    ]


def checkpoint_note(settings: FitSettings) -> str:
    return ", checkpointed" if settings.gradient_checkpointing else ""


def dpo_components(policy: ModelShape, settings: FitSettings) -> list[Component]:
    """DPO (and KTO/ORPO, which hold at most as much): the policy's training state, the reference (a copy unless
    LoRA), and chosen + rejected rows in one forward; the reference's no-grad forward comes first, on its own."""
    e = DTYPE_BYTES[settings.dtype]
    tokens = 2 * settings.batch_size * settings.seq_len
    reference = 0 if settings.lora else weight_bytes(policy, settings)
    return [
        *trainer_components(policy, settings, "", "policy"),
        Component(
            "reference_weights",
            "reference weights",
            reference,
            "static",
            "adapter disabled on the policy" if settings.lora else "frozen copy of the policy",
        ),
        Component(
            "activations",
            "activations",
            activation_bytes(policy, settings, tokens, dropout=True),
            "train",
            f"2 x {settings.batch_size} x {settings.seq_len} tokens (chosen + rejected)" + checkpoint_note(settings),
        ),
        Component(
            "logits",
            "logits + log-probs",
            logits_bytes(policy, settings, tokens),
            "train",
            f"{tokens:,} tokens x vocab {policy.vocab:,} x ({e}+8) B",
        ),
        Component(
            "reference_logits",
            "reference logits",
            tokens * policy.vocab * e,
            "reference: score",
            f"no-grad forward, {tokens:,} tokens x vocab {policy.vocab:,} x {e} B",
        ),
    ]


def ppo_components(
    model_config: PretrainedConfig, policy: ModelShape, settings: FitSettings
) -> tuple[list[Component], int]:
    """PPO's static parts (policy and value training state, reference, reward model, kept scores), its training,
    generation and scoring transients, and the trainable parameter count of policy and value together."""
    cls = model_shape(model_config, "cls")
    e = DTYPE_BYTES[settings.dtype]
    batch, query, response = settings.batch_size, settings.seq_len, settings.response_length
    tokens = batch * (query + response)
    policy_parts = trainer_components(policy, settings, "policy_", "policy")
    value_parts = trainer_components(cls, settings, "value_", "value model")
    reference = 0 if settings.lora else weight_bytes(policy, settings)
    reward = Component(
        "reward_weights",
        "reward model weights",
        weight_bytes(cls, settings),
        "static",
        f"{cls.param_count:,} params, {_weights_label(settings)}, frozen",
    )
    if settings.shared_base:  # one frozen base: the reward model is its RM adapter + score head, frozen
        reward_adapter = lora_param_count(cls, settings.lora_r)
        reward = Component(
            "reward_weights",
            "reward model (RM adapter + head)",
            4 * reward_adapter + unquantized_bytes(settings) * cls.head_param_count,
            "static",
            f"{reward_adapter:,} LoRA params x 4 B + score head {cls.head_param_count:,} params, on the policy's base",
        )
        value_parts[0] = Component("value_weights", "value model weights", 0, "static", "the policy's base (shared)")
    static = [
        *policy_parts[:2],
        Component(
            "reference_weights",
            "reference weights",
            reference,
            "static",
            "adapter disabled on the policy" if settings.lora else "frozen copy of the policy",
        ),
        reward,
        *value_parts[:2],
        Component(
            "gradients",
            "gradients (policy + value)",
            policy_parts[2].bytes + value_parts[2].bytes,
            "static",
            "trainable params of both",
        ),
        Component(
            "optimizer",
            "AdamW states (policy + value)",
            policy_parts[3].bytes + value_parts[3].bytes,
            "static",
            "exp_avg + exp_avg_sq",
        ),
        Component(
            "rollout_scores",
            "generation scores kept",
            batch * response * policy.vocab * 4,
            "static",
            f"{batch} x {response} x vocab {policy.vocab:,} fp32 (trl keeps them through the update)",
        ),
    ]
    checkpointed = checkpoint_note(settings)
    kv = 2 * policy.layers * batch * (query + response) * policy.kv_dim * e
    transient = [
        # PPO disables dropout in every model, LoRA's included.
        Component(
            "policy_activations",
            "policy activations",
            activation_bytes(policy, settings, tokens, False),
            "train",
            f"{batch} x ({query}+{response}) tokens" + checkpointed,
        ),
        Component(
            "value_activations",
            "value model activations",
            activation_bytes(cls, settings, tokens, False),
            "train",
            f"{batch} x ({query}+{response}) tokens" + checkpointed,
        ),
        Component(
            "logits",
            "policy logits + log-probs",
            tokens * policy.vocab * e + batch * response * policy.vocab * 8,
            "train",
            f"all {tokens:,} positions x ({e} B) + response log-softmax and its gradient (fp32)",
        ),
        Component(
            "kv_cache",
            "generation KV cache",
            kv,
            "rollout: generate",
            f"2 x {policy.layers} layers x {batch} x {query + response} x {policy.kv_dim} x {e} B",
        ),
        Component(
            "generation_scores",
            "generation scores (stacking)",
            batch * response * policy.vocab * 4,
            "rollout: generate",
            "per-step fp32 scores before torch.stack",
        ),
        Component(
            "scoring_logits",
            "reference/policy scoring logits",
            tokens * policy.vocab * e,
            "rollout: score",
            "no-grad forward over query + response",
        ),
    ]
    trainable = trainable_params(policy, settings)[0] + trainable_params(cls, settings)[0]
    return static + transient, trainable
