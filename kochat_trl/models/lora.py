"""Which layers LoRA trains: per-architecture targets, and TRL's LoRA config for a causal LM or a reward model.

`trl.get_peft_config` builds the config; this module picks the target modules Korean checkpoints need (kogpt2's fused
Conv1D, polyglot-ko's query_key_value) and keeps a reward model's new score head trainable.
"""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING, Any

from torch import nn
from trl import ModelConfig, get_peft_config

from kochat_trl.errors import ConfigError

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PretrainedConfig, PreTrainedModel

_ATTENTION_QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
_ATTENTION_QKV_OUT = ["q_proj", "k_proj", "v_proj", "out_proj"]

# Attention projections per `config.model_type`: the usual LoRA choice for RLHF on one GPU.
LORA_TARGETS_BY_MODEL_TYPE: dict[str, list[str]] = {
    "gpt2": ["c_attn"],  # skt/kogpt2 (fused q/k/v, a transformers Conv1D)
    "gpt_neox": ["query_key_value"],  # EleutherAI/polyglot-ko
    "bloom": ["query_key_value"],
    "gptj": _ATTENTION_QKV_OUT,  # kakaobrain/kogpt
    "gpt_neo": _ATTENTION_QKV_OUT,
    "phi3": ["qkv_proj", "o_proj"],
    **{
        model_type: _ATTENTION_QKVO
        for model_type in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3",
            "gemma3_text",
            "exaone4",
            "olmo",
            "olmo2",
            "stablelm",
            "phi",
        )
    },
}

# Output heads never get LoRA: they are new (score) or tied to the embeddings (lm_head).
_HEAD_MODULE_NAMES = {"lm_head", "score", "classifier"}

_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")


def _config_of(model_or_config: Any) -> PretrainedConfig:
    return getattr(model_or_config, "config", model_or_config)


def lora_target_modules(model_or_config: PreTrainedModel | PretrainedConfig) -> list[str]:
    """LoRA target module names for this architecture (leaf names, as `LoraConfig.target_modules`)."""
    model_type = getattr(_config_of(model_or_config), "model_type", None)
    if model_type in LORA_TARGETS_BY_MODEL_TYPE:
        return list(LORA_TARGETS_BY_MODEL_TYPE[model_type])
    if not isinstance(model_or_config, nn.Module):
        raise ConfigError(
            f"no default LoRA target modules for model_type {model_type!r}; "
            "set `lora_target_modules` (e.g. [q_proj, v_proj]) in the model config"
        )
    from transformers.pytorch_utils import Conv1D

    # Unknown architecture: every linear layer except the output heads (bnb Linear8bitLt/4bit are nn.Linear).
    leaf_names = {
        name.rsplit(".", 1)[-1]
        for name, module in model_or_config.named_modules()
        if isinstance(module, nn.Linear | Conv1D)
    }
    targets = sorted(leaf_names - _HEAD_MODULE_NAMES)
    if not targets:
        raise ConfigError(
            f"found no linear layers for LoRA in model_type {model_type!r}; "
            "set `lora_target_modules` in the model config"
        )
    return targets


def build_peft_config(
    model_args: ModelConfig, model_or_config: PreTrainedModel | PretrainedConfig, task_type: str
) -> LoraConfig | None:
    """trl's LoRA config for `task_type` ("CAUSAL_LM" or "SEQ_CLS"), with per-architecture default targets."""
    if not model_args.use_peft:
        return None
    if task_type not in _TASK_TYPES:
        raise ConfigError(f"task_type must be one of {', '.join(_TASK_TYPES)}, got {task_type!r}")
    # A shallow copy: get_peft_config reads these fields and the caller's ModelConfig stays untouched.
    lora_args = copy.copy(model_args)
    lora_args.lora_task_type = task_type
    targets = model_args.lora_target_modules
    if not targets:  # None, [] or ""
        targets = lora_target_modules(model_or_config)
    elif isinstance(targets, str) and targets != "all-linear" and re.fullmatch(r"[\w.]+", targets):
        # ModelConfig.__post_init__ turns a one-item list into a bare string, which peft treats as a
        # full-name regex that matches no nested module; a plain name was meant as a list of one.
        targets = [targets]
    lora_args.lora_target_modules = targets
    if task_type == "SEQ_CLS":
        # The reward head is freshly initialised: it must be trained and saved with the adapter.
        modules_to_save = list(model_args.lora_modules_to_save or [])
        if "score" not in modules_to_save:
            modules_to_save.append("score")
        lora_args.lora_modules_to_save = modules_to_save
    return get_peft_config(lora_args)
