"""Model and tokenizer loading shared by every recipe (SFT, reward model, PPO).

Thin on purpose: trl's `ModelConfig` describes the model, `trl.get_quantization_config` and
`trl.get_peft_config` build the bitsandbytes/LoRA configs, peft prepares k-bit models. This module
adds what Korean checkpoints and a single 24 GB GPU need on top: special-token fixes (kogpt2, polyglot-ko,
pad == eos) and a guard against a bitsandbytes CPU trap; LoRA targets per architecture are in `models.lora`.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import TrainerCallback
from trl import ModelConfig, get_quantization_config

from kochat_trl.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Tokens that already mean padding in common vocabularies; reused before adding a new one.
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "<|padding|>")
NEW_PAD_TOKEN = "<pad>"

# skt/kogpt2-base-v2 ships a tokenizer without special-token metadata (its model card passes these).
KOGPT2_SPECIAL_TOKENS = {
    "bos_token": "</s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}
POLYGLOT_KO_EOS = "<|endoftext|>"  # id 2 in EleutherAI/polyglot-ko vocabularies

NON_REENTRANT = {"use_reentrant": False}
_DTYPES = ("auto", "float32", "bfloat16", "float16")


def fix_tokenizer(
    tokenizer: PreTrainedTokenizerBase, model_type: str | None = None, name_or_path: str = ""
) -> PreTrainedTokenizerBase:
    """Special tokens that training needs: known Korean checkpoints' quirks, and a pad distinct from eos.

    May add a token: the loaders resize the model's embeddings when `len(tokenizer)` outgrew them.
    """
    name = (name_or_path or getattr(tokenizer, "name_or_path", "") or "").lower()
    if "kogpt2" in name and model_type in (None, "gpt2"):
        tokenizer.add_special_tokens(KOGPT2_SPECIAL_TOKENS)
    if "polyglot-ko" in name and tokenizer.eos_token != POLYGLOT_KO_EOS:
        if POLYGLOT_KO_EOS in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"eos_token": POLYGLOT_KO_EOS})
    # pad == eos masks every eos as padding: the model never learns to stop.
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        existing = next((token for token in _PAD_CANDIDATES if token in vocab), None)
        tokenizer.add_special_tokens({"pad_token": existing or NEW_PAD_TOKEN})
    return tokenizer


def load_tokenizer(
    model_args: ModelConfig, padding_side: str = "right", template: str | None = None, announce: bool = True
) -> PreTrainedTokenizerBase:
    """The tokenizer of `model_args.model_name_or_path`, fixed by `fix_tokenizer`, carrying prompt template
    `template` as its chat template (None: the one it was saved with; see `templates.install_template`).
    `announce`: print a note when the template is replaced or defaulted."""
    from transformers import AutoConfig, AutoTokenizer

    from kochat_trl.data.templates import install_template
    from kochat_trl.run.console import note

    model_path = _model_path(model_args)
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    source = {"revision": model_args.model_revision, "trust_remote_code": _trust_remote_code(model_args)}
    tokenizer = AutoTokenizer.from_pretrained(model_path, **source)
    try:
        model_type = AutoConfig.from_pretrained(model_path, **source).model_type
    except (OSError, ValueError):  # a tokenizer-only directory: name-based fixes still apply
        model_type = None
    fix_tokenizer(tokenizer, model_type, model_path)
    tokenizer.padding_side = padding_side
    _, message = install_template(tokenizer, template, where=model_path)
    if message and announce:
        note(message)
    return tokenizer


def at_path(model_args: ModelConfig, path: str | None) -> ModelConfig:
    """`model_args` (quantization, dtype, revision, trust_remote_code) for another model, without LoRA: how the
    RL and preference recipes load a frozen reward model (and PPO its value model) next to the policy."""
    other = copy.copy(model_args)
    other.model_name_or_path, other.use_peft = path, False
    return other


def _model_path(model_args: ModelConfig) -> str:
    if not model_args.model_name_or_path:
        raise ConfigError("model_name_or_path is not set; give a hub id or a local model directory")
    return model_args.model_name_or_path


def _trust_remote_code(model_args: ModelConfig) -> bool:
    # trl 1.x moved trust_remote_code from ModelConfig to the trainer configs; config.parsing.parse_recipe_args
    # copies the trainer config's value onto model_args.
    return bool(getattr(model_args, "trust_remote_code", False))


def _kbit_device_map() -> dict[str, int] | None:
    # trl 1.12 no longer exports get_kbit_device_map; this is its body: one whole model per process.
    from accelerate import PartialState

    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return {"": PartialState().local_process_index}
    return None


def _auto_compute_dtype() -> torch.dtype:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def model_init_kwargs(model_args: ModelConfig) -> dict[str, Any]:
    """`from_pretrained` keyword arguments for `model_args` (dtype, revision, quantization, device map)."""
    if model_args.load_in_8bit and model_args.load_in_4bit:
        raise ConfigError("load_in_8bit and load_in_4bit are both set; choose one (load_in_4bit uses the least memory)")
    dtype_name = model_args.dtype or "float32"
    if dtype_name not in _DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype_name!r}")
    kwargs: dict[str, Any] = {
        "dtype": dtype_name if dtype_name == "auto" else getattr(torch, dtype_name),
        "revision": model_args.model_revision,
        "trust_remote_code": _trust_remote_code(model_args),
    }
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.load_in_8bit or model_args.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            flag = "load_in_8bit" if model_args.load_in_8bit else "load_in_4bit"
            raise ConfigError(
                f"{flag} needs bitsandbytes, which is not importable ({error}); "
                f"run `pip install bitsandbytes` or set {flag}: false"
            ) from error
        quant_args = model_args
        if dtype_name == "auto":
            # get_quantization_config passes dtype straight to bnb_4bit_compute_dtype, where "auto" fails.
            quant_args = copy.copy(model_args)
            quant_args.dtype = str(_auto_compute_dtype()).removeprefix("torch.")
        kwargs["quantization_config"] = get_quantization_config(quant_args)
        kwargs["device_map"] = _kbit_device_map()
    return kwargs


def _is_quantized(model: PreTrainedModel) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def _finish_loading(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, gradient_checkpointing: bool
) -> PreTrainedModel:
    """Shared tail of the loaders: embeddings for added tokens, pad/eos ids, k-bit preparation."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
        model_eos = generation_config.eos_token_id
        model_eos_ids = model_eos if isinstance(model_eos, list) else [model_eos]
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in model_eos_ids:
            # Generation must stop at the eos the chat template writes (polyglot-ko configs disagree).
            generation_config.eos_token_id = tokenizer.eos_token_id
    if _is_quantized(model):
        from peft import prepare_model_for_kbit_training

        # Non-reentrant checkpointing: no input-grad hook needed, and torch warns about the implicit default.
        # peft 0.22 renamed the keyword (the old one warns); 0.17-0.21 know only the old one.
        parameters = inspect.signature(prepare_model_for_kbit_training).parameters
        keyword = next(
            k for k in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs") if k in parameters
        )
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, **{keyword: NON_REENTRANT}
        )
    elif gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=NON_REENTRANT)
    if gradient_checkpointing:
        model.config.use_cache = False  # the cache is useless when activations are recomputed
    disable_bnb_cpu_bf16_repack(model)
    return model


def adapter_base(path: str | os.PathLike) -> str | None:
    """The base model of a PEFT adapter folder, or None when `path` is a full model."""
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        return None
    return json.loads(config_file.read_text(encoding="utf-8"))["base_model_name_or_path"]


def _from_pretrained(auto_class: Any, model_args: ModelConfig, **kwargs: Any) -> PreTrainedModel:
    """Load a full model, or base + adapter merged in memory when the path is a PEFT adapter folder."""
    path = _model_path(model_args)
    base = adapter_base(path)
    if base is None:
        return auto_class.from_pretrained(path, **kwargs, **model_init_kwargs(model_args))
    if model_args.load_in_8bit or model_args.load_in_4bit:
        raise ConfigError(
            f"{path} is a LoRA adapter; merging it into 8-bit/4-bit weights loses precision. "
            f"Merge it first (kochat-trl merge --adapter {path} -o MERGED) and load MERGED quantized"
        )
    from peft import PeftModel

    model = auto_class.from_pretrained(base, **kwargs, **model_init_kwargs(model_args))
    return PeftModel.from_pretrained(model, path).merge_and_unload()


def load_causal_lm(
    model_args: ModelConfig, tokenizer: PreTrainedTokenizerBase, gradient_checkpointing: bool = False
) -> PreTrainedModel:
    """The policy/SFT model: `AutoModelForCausalLM` with `model_init_kwargs`, ready for LoRA.

    An adapter folder (an SFT trained with LoRA) loads as its base with the adapter merged in.
    """
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, model_args)
    return _finish_loading(model, tokenizer, gradient_checkpointing)


def load_reward_model(
    model_args: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    num_labels: int = 1,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """The reward/value model: `AutoModelForSequenceClassification` with a `num_labels` score head."""
    from transformers import AutoModelForSequenceClassification

    model = _from_pretrained(AutoModelForSequenceClassification, model_args, num_labels=num_labels)
    # Sequence classification scores the last non-pad token, found through config.pad_token_id.
    return _finish_loading(model, tokenizer, gradient_checkpointing)


def disable_bnb_cpu_bf16_repack(model: nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; returns how many modules changed.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit` weight the first time it runs
    in eval mode without grad; the repacked kernel has no backward, so gradients stop at every 4-bit
    layer and LoRA adapters behind them (q/k/v) silently get zero gradients. Already repacked weights
    are converted back.
    """
    four_bit = [
        module
        for module in model.modules()
        if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")
    ]
    if not four_bit:  # nothing to do, and no reason to import bitsandbytes
        return 0
    changed = 0
    for module in four_bit:
        was_enabled = getattr(module, "support_avx512bf16_for_cpu", False)
        module.support_avx512bf16_for_cpu = False
        quant_state = getattr(module.weight, "quant_state", None)
        was_packed = bool(getattr(quant_state, "packing_format_for_cpu", False))
        if was_packed:
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, quant_state
            )
        changed += was_enabled or was_packed
    return changed


def trainable_parameter_share(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size, like peft does."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":
            count *= 2 * parameter.element_size()  # two 4-bit values per stored byte
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


class Float32Adapters(TrainerCallback):
    """Undo TRL's bf16 cast of a quantized model's trainable parameters when the run trains in float32.

    TRL 1.12's SFT, reward, DPO, KTO, GRPO and RLOO trainers cast them in `__init__`, before `Trainer.__init__`,
    whatever `bf16` says (the QLoRA paper's choice); without bf16 autocast the float32 activations then meet a bf16
    head kept in `modules_to_save` ("expected m1 and m2 to have the same dtype"). `on_init_end` runs after that cast
    and before `train()` builds the optimizer."""

    def on_init_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **_: Any) -> None:
        if model is None or not _is_quantized(model) or getattr(args, "bf16", False) or getattr(args, "fp16", False):
            return
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.dtype == torch.bfloat16:
                parameter.data = parameter.data.float()
