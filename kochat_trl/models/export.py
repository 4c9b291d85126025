"""Merge a LoRA adapter into its base model and export a plain, self-contained checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kochat_trl.data.templates import saved_template_name
from kochat_trl.errors import ConfigError, KochatError
from kochat_trl.models.model_card import HUB_ID, example_input, model_card, stage_name
from kochat_trl.run.outputs import METRICS_FILE, atomic_output_dir, check_output_dir

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

ADAPTER_CONFIG = "adapter_config.json"
MERGE_INFO = "kochat_merge.json"
MERGE_DTYPES = ("float32", "float16", "bfloat16")
_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")
_HEAD_NAMES = ("score", "classifier")
_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def merge_adapter(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    push_to_hub: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Merge the LoRA adapter in `adapter_dir` into its base and save the result to `output_dir`.

    The merged folder loads with `AutoModelForCausalLM` / `AutoModelForSequenceClassification` alone
    (no peft, no bitsandbytes): safetensors weights, tokenizer, generation config and a model card.
    An adapter trained on an 8-bit/4-bit base (QLoRA) is always merged into a full-precision reload of
    that base: adding the LoRA delta to quantized weights would re-quantize it away.

    `base` defaults to the adapter's `base_model_name_or_path`; `metrics` are shown on the model card
    next to the adapter's own `metrics.json`; `push_to_hub` is a repo id to upload the folder to.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    adapter_config = read_adapter_config(adapter_dir)
    if dtype not in MERGE_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(MERGE_DTYPES)}, got {dtype!r}")
    output = check_output_dir(output_dir, overwrite)  # refuse before minutes of loading, not after
    base = _resolve_base(base, adapter_config, adapter_dir)
    if output.resolve() in (adapter_dir.resolve(), Path(base).resolve()):
        raise KochatError(f"{output}: output folder is the adapter or base folder; choose a new folder")
    base_config = _full_precision_base_config(base)
    run_metrics = _read_json(adapter_dir / METRICS_FILE) or {}  # a broken file fails here, before loading
    training_config = _read_training_config(adapter_dir)

    tokenizer = _adapter_tokenizer(adapter_dir, base, run_metrics.get("template") or training_config.get("template"))
    task_type = adapter_config["task_type"]
    model = _load_full_precision_base(base, base_config, tokenizer, dtype, task_type, adapter_dir, adapter_config)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
        merged = peft_model.merge_and_unload()
    except (AttributeError, ValueError, RuntimeError, KeyError) as error:
        raise KochatError(f"{adapter_dir}: cannot merge this adapter into {base}: {_first_line(error)}") from error
    merged.config.pad_token_id = tokenizer.pad_token_id
    _set_generation_tokens(merged, tokenizer)
    merged.eval()

    info = {
        "base_model": base,
        "adapter": str(adapter_dir),
        "task_type": task_type,
        "dtype": dtype,
        "stage": stage_name(task_type, run_metrics, training_config),
        "dataset": training_config.get("dataset_name") or run_metrics.get("dataset_name"),
        "template": saved_template_name(tokenizer),
        "lora": {key: adapter_config.get(key) for key in ("r", "lora_alpha", "target_modules", "modules_to_save")},
        "trained_quantized": _training_quantization(training_config),
        "metrics": run_metrics,
        "extra_metrics": dict(metrics or {}),
        "push_to_hub": push_to_hub,  # requested; a failed upload is reported, the folder stays
    }
    info["example_input"] = example_input(tokenizer, task_type)
    with atomic_output_dir(output, overwrite) as staging:
        # transformers 5 writes safetensors only (the `safe_serialization` switch is gone).
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(model_card(info, output), encoding="utf-8")
        (staging / MERGE_INFO).write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if push_to_hub:
        push_folder_to_hub(output, push_to_hub)
    return output


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The adapter's `adapter_config.json`, checked to be a PEFT adapter of a task we can merge."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise KochatError(f"{adapter_dir}: adapter folder not found; pass the output_dir of a LoRA run")
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise KochatError(
            f"{adapter_dir}: not a PEFT adapter folder (no {ADAPTER_CONFIG}); "
            "pass the output_dir of a run with use_peft: true (a full fine-tune needs no merging)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KochatError(f"{config_path}: not valid JSON ({error})") from error
    if config.get("task_type") not in _TASK_TYPES:
        raise KochatError(
            f"{config_path}: task_type {config.get('task_type')!r} cannot be merged here; "
            f"expected one of {', '.join(_TASK_TYPES)}"
        )
    return config


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str) -> str:
    """Upload `folder` to the model repo `repo_id` (created private if missing); returns the commit URL.

    The token comes from huggingface_hub's usual places (HF_TOKEN, `hf auth login`); it is never
    passed, printed or written here, and is scrubbed from error messages.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="Upload merged kochat-trl model"
        )
    except Exception as error:  # network, auth, validation: all reported the same way
        raise KochatError(
            f"push to the hub repo {repo_id} failed ({type(error).__name__}: {_redact(_first_line(error))}); "
            f"the merged model is saved at {folder}, upload it later with `hf upload {repo_id} {folder}`"
        ) from None  # no chained traceback: it may quote request headers
    return str(getattr(commit, "commit_url", commit))


def _resolve_base(base: str | None, adapter_config: dict[str, Any], adapter_dir: Path) -> str:
    from_config = base is None
    base = base or adapter_config.get("base_model_name_or_path")
    if not base:
        raise KochatError(f"{adapter_dir / ADAPTER_CONFIG}: no base_model_name_or_path; pass --base PATH")
    if Path(base).exists() or HUB_ID.fullmatch(base):
        return base
    where = f"{adapter_dir / ADAPTER_CONFIG} names base model" if from_config else "base model"
    raise KochatError(f"{where} {base!r}, which is not a folder here; pass --base PATH to the base model")


def _full_precision_base_config(base: str) -> PretrainedConfig:
    """The base's config; a checkpoint saved quantized is refused (its weights cannot take the delta)."""
    from transformers import AutoConfig

    if (Path(base) / ADAPTER_CONFIG).is_file():
        raise KochatError(
            f"{base}: the base is itself a LoRA adapter; merge it first "
            f"(kochat-trl merge --adapter {base} -o MERGED_BASE) and pass --base MERGED_BASE"
        )
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as error:
        raise KochatError(
            f"{base}: cannot load the base model config ({_first_line(error)}); pass --base with a local model folder"
        ) from error
    if getattr(config, "quantization_config", None):
        raise KochatError(
            f"{base}: the base checkpoint is saved quantized; merge into the full-precision original "
            "(pass --base PATH to the unquantized model)"
        )
    return config


def _adapter_tokenizer(adapter_dir: Path, base: str, recorded_template: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside the adapter (it may have added tokens), else the base's, fixed as in training.

    It carries the chat template the run trained with; a run saved before tokenizers carried it gets the
    template its metrics.json / config.yaml record (`recorded_template`)."""
    from transformers import AutoTokenizer
    from trl import ModelConfig

    from kochat_trl.data.templates import CHAT, TEMPLATES, install_template
    from kochat_trl.models.loading import load_tokenizer

    if (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    else:
        tokenizer = load_tokenizer(ModelConfig(model_name_or_path=base), announce=False)
    if not getattr(tokenizer, "chat_template", None) and recorded_template in TEMPLATES and recorded_template != CHAT:
        install_template(tokenizer, recorded_template)
    return tokenizer


def _set_generation_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """eos and pad in generation_config.json, so a serving client (vLLM, TGI, pipeline) stops where the model stops."""
    config = getattr(model, "generation_config", None)
    if config is None or not model.can_generate():
        return
    config.pad_token_id = tokenizer.pad_token_id
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id


def _load_full_precision_base(
    base: str,
    base_config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    dtype: str,
    task_type: str,
    adapter_dir: Path,
    adapter_config: dict[str, Any],
) -> PreTrainedModel:
    """The base in `dtype`, never quantized, embeddings resized to the tokenizer, pad id set (shared loaders)."""
    from trl import ModelConfig

    from kochat_trl.models.loading import load_causal_lm, load_reward_model

    # A fresh ModelConfig has load_in_8bit/load_in_4bit off: no quantization_config reaches from_pretrained.
    model_args = ModelConfig(model_name_or_path=base, dtype=dtype)
    if task_type == "CAUSAL_LM":
        return load_causal_lm(model_args, tokenizer)
    num_labels = _num_labels(base_config, adapter_dir, adapter_config)
    return load_reward_model(model_args, tokenizer, num_labels=num_labels)


def _num_labels(base_config: PretrainedConfig, adapter_dir: Path, adapter_config: dict[str, Any]) -> int:
    """Rows of the trained head saved with the adapter (modules_to_save), else the base's own head."""
    heads = [name for name in adapter_config.get("modules_to_save") or [] if name.split(".")[-1] in _HEAD_NAMES]
    weights = adapter_dir / "adapter_model.safetensors"
    if heads and weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as tensors:
            for key in tensors.keys():
                if any(key.endswith(f"{head}.weight") for head in heads):
                    return int(tensors.get_slice(key).get_shape()[0])
    if any(name.endswith("ForSequenceClassification") for name in base_config.architectures or []):
        return int(base_config.num_labels)
    raise KochatError(
        f"{adapter_dir}: SEQ_CLS adapter without a trained score head (modules_to_save) on a base without one; "
        "the merged reward model would score at random. Train with lora_modules_to_save: [score]"
    )


def _training_quantization(training_config: dict[str, Any]) -> str | None:
    for bits in ("4bit", "8bit"):
        if training_config.get(f"load_in_{bits}"):
            return bits
    return None


def _read_training_config(adapter_dir: Path) -> dict[str, Any]:
    """The run's `config.yaml` (written by kochat-trl recipes), or {} for adapters from elsewhere."""
    import yaml

    path = adapter_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return config if isinstance(config, dict) else {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KochatError(f"{path}: not valid JSON ({error})") from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _redact(text: str) -> str:
    for name in _TOKEN_ENV:
        token = os.environ.get(name)
        if token:
            text = text.replace(token, "***")
    return text
