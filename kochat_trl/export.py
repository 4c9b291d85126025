"""Merge a LoRA adapter into its base model and export a plain, self-contained checkpoint.

The merged folder loads with `AutoModelForCausalLM` / `AutoModelForSequenceClassification` alone
(no peft, no bitsandbytes): safetensors weights, tokenizer, generation config and a model card.
An adapter trained on an 8-bit/4-bit base (QLoRA) is always merged into a full-precision reload of
that base: adding the LoRA delta to quantized weights would re-quantize it away.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kochat_trl.errors import ConfigError, KochatError
from kochat_trl.outputs import atomic_output_dir, check_output_dir
from kochat_trl.runs import METRICS_FILE
from kochat_trl.templates import EXAMPLE_ANSWER, EXAMPLE_QUESTION, answered, prompt_text, saved_template_name

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

ADAPTER_CONFIG = "adapter_config.json"
MERGE_INFO = "kochat_merge.json"
MERGE_DTYPES = ("float32", "float16", "bfloat16")
_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")
_HEAD_NAMES = ("score", "classifier")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# Keys a PPO run's config has and an SFT run's has not (used only to name the stage on the card).
_PPO_KEYS = ("kl_coef", "num_ppo_epochs", "cliprange")
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
        "stage": _stage_name(task_type, run_metrics, training_config),
        "dataset": training_config.get("dataset_name") or run_metrics.get("dataset_name"),
        "template": saved_template_name(tokenizer),
        "lora": {key: adapter_config.get(key) for key in ("r", "lora_alpha", "target_modules", "modules_to_save")},
        "trained_quantized": _training_quantization(training_config),
        "metrics": run_metrics,
        "extra_metrics": dict(metrics or {}),
        "push_to_hub": push_to_hub,  # requested; a failed upload is reported, the folder stays
    }
    info["example_input"] = _example_input(tokenizer, task_type)
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
    if Path(base).exists() or _HUB_ID.fullmatch(base):
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

    from kochat_trl.modeling import load_tokenizer
    from kochat_trl.templates import CHAT, TEMPLATES, install_template

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

    from kochat_trl.modeling import load_causal_lm, load_reward_model

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


def _stage_name(task_type: str, metrics: dict[str, Any], config: dict[str, Any]) -> str:
    if metrics.get("stage"):
        return str(metrics["stage"])
    if task_type == "SEQ_CLS":
        return "reward model (RM)"
    if any(key in config for key in _PPO_KEYS):
        return "PPO"
    return "SFT"


def _example_input(tokenizer: PreTrainedTokenizerBase, task_type: str) -> str | None:
    """The card's example conversation as the chat template renders it (with the answer for a reward model)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    if task_type == "SEQ_CLS":
        return tokenizer.apply_chat_template(answered(EXAMPLE_QUESTION, EXAMPLE_ANSWER), tokenize=False)
    return prompt_text(tokenizer, EXAMPLE_QUESTION)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _redact(text: str) -> str:
    for name in _TOKEN_ENV:
        token = os.environ.get(name)
        if token:
            text = text.replace(token, "***")
    return text


def _format_metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _metrics_table(metrics: dict[str, Any]) -> list[str]:
    rows = ["| metric | value |", "|---|---|"]
    rows += [
        f"| {key} | {_format_metric(value)} |" for key, value in metrics.items() if not isinstance(value, dict | list)
    ]
    return rows


def model_card(info: dict[str, Any], output: str | os.PathLike) -> str:
    """README.md for the merged model (Korean + English): provenance, metrics, dtype and how to load it."""
    from kochat_trl import __version__

    base = info["base_model"]
    is_classifier = info["task_type"] == "SEQ_CLS"
    auto_class = "AutoModelForSequenceClassification" if is_classifier else "AutoModelForCausalLM"
    front = ["---", "library_name: transformers", "tags:", "- kochat-trl", "- korean", "- rlhf", "- merged-lora"]
    if _HUB_ID.fullmatch(base) and not Path(base).exists():
        front.append(f"base_model: {base}")  # the hub rejects a local path here
    front += [
        "language:",
        "- ko",
        f"pipeline_tag: {'text-classification' if is_classifier else 'text-generation'}",
        "---",
    ]
    quantized = info["trained_quantized"]
    lora = info["lora"]
    lines = [
        *front,
        "",
        f"# {Path(output).name}",
        "",
        f"LoRA 어댑터를 기반 모델에 병합한 모델입니다 (kochat-trl {__version__}). "
        "peft 없이 transformers만으로 불러올 수 있습니다.",
        "",
        f"A LoRA adapter merged into its base model with kochat-trl {__version__}; "
        "it loads with plain transformers, no peft needed.",
        "",
        "| 항목 / item | 값 / value |",
        "|---|---|",
        f"| 기반 모델 / base model | `{base}` |",
        f"| 어댑터 / adapter | `{info['adapter']}` |",
        f"| 단계 / stage | {info['stage']} |",
        f"| 데이터 / data set | {info['dataset'] or 'unknown'} |",
        f"| 프롬프트 템플릿 / template | {info['template'] or 'unknown'} |",
        f"| 작업 / task | {info['task_type']} |",
        f"| 저장 dtype / saved dtype | {info['dtype']} |",
        f"| LoRA | r={lora['r']}, alpha={lora['lora_alpha']}, targets={_join(lora['target_modules'])}, "
        f"modules_to_save={_join(lora['modules_to_save'])} |",
    ]
    if quantized:
        lines.append(f"| 학습 시 양자화 / trained on | {quantized} base (QLoRA); merged into the full-precision base |")
    for title, metrics in (
        ("학습 지표 / training metrics", info["metrics"]),
        ("추가 지표 / extra metrics", info["extra_metrics"]),
    ):
        if metrics:
            lines += ["", f"## {title}", "", *_metrics_table(metrics)]
    lines += [
        "",
        "## 사용법 / How to load",
        "",
        "토크나이저에 학습 때의 프롬프트 템플릿이 chat template으로 들어 있습니다: `apply_chat_template`으로 "
        "형식을 맞추세요. / The tokenizer carries the training prompt template as its chat template: format "
        "conversations with `apply_chat_template`.",
        "",
        "```python",
        "import torch",
        f"from transformers import AutoTokenizer, {auto_class}" + ("" if is_classifier else ", pipeline"),
        "",
        f'path = "{Path(output).name}"  # this folder or its hub repo id',
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        f"model = {auto_class}.from_pretrained(path, dtype=torch.{info['dtype']})",
    ]
    question, answer = json.dumps(EXAMPLE_QUESTION, ensure_ascii=False), json.dumps(EXAMPLE_ANSWER, ensure_ascii=False)
    if is_classifier:
        lines += [
            f'messages = [{{"role": "user", "content": {question}}}, {{"role": "assistant", "content": {answer}}}]',
            'inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)',
            "reward = model(**inputs).logits[0, 0].item()",
        ]
    else:
        lines += [
            f'messages = [{{"role": "user", "content": {question}}}]',
            'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
            "return_dict=True)",
            "output = model.generate(**inputs, max_new_tokens=64)",
            'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
            "",
            "# the same through the transformers chat pipeline (it samples unless do_sample=False)",
            'chat = pipeline("text-generation", model=path)',
            'print(chat(messages, do_sample=False, max_new_tokens=64)[0]["generated_text"][-1]["content"])',
        ]
    lines += ["```", ""]
    if info.get("example_input"):
        what = "the conversation with its answer" if is_classifier else "the prompt"
        lines += [
            f"The chat template renders {what} as (template `{info['template']}`):",
            "",
            "```text",
            info["example_input"],
            "```",
            "",
        ]
    return "\n".join(lines)


def _join(value: Any) -> str:
    if not value:
        return "-"
    return ", ".join(sorted(set(value))) if isinstance(value, list | set | tuple) else str(value)
