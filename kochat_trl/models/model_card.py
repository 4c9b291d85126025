"""The merged model's README.md (model card): provenance, metrics, dtype and how to load it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kochat_trl.data.templates import EXAMPLE_ANSWER, EXAMPLE_QUESTION, answered, prompt_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# Keys a PPO run's config has and an SFT run's has not (used only to name the stage on the card).
_PPO_KEYS = ("kl_coef", "num_ppo_epochs", "cliprange")


def model_card(info: dict[str, Any], output: str | os.PathLike) -> str:
    """README.md for the merged model (Korean + English): provenance, metrics, dtype and how to load it."""
    from kochat_trl import __version__

    base = info["base_model"]
    is_classifier = info["task_type"] == "SEQ_CLS"
    auto_class = "AutoModelForSequenceClassification" if is_classifier else "AutoModelForCausalLM"
    front = ["---", "library_name: transformers", "tags:", "- kochat-trl", "- korean", "- rlhf", "- merged-lora"]
    if HUB_ID.fullmatch(base) and not Path(base).exists():
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


def stage_name(task_type: str, metrics: dict[str, Any], config: dict[str, Any]) -> str:
    """The training stage the card names: recorded in metrics.json, else guessed from the task and config."""
    if metrics.get("stage"):
        return str(metrics["stage"])
    if task_type == "SEQ_CLS":
        return "reward model (RM)"
    if any(key in config for key in _PPO_KEYS):
        return "PPO"
    return "SFT"


def example_input(tokenizer: PreTrainedTokenizerBase, task_type: str) -> str | None:
    """The card's example conversation as the chat template renders it (with the answer for a reward model)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    if task_type == "SEQ_CLS":
        return tokenizer.apply_chat_template(answered(EXAMPLE_QUESTION, EXAMPLE_ANSWER), tokenize=False)
    return prompt_text(tokenizer, EXAMPLE_QUESTION)


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


def _join(value: Any) -> str:
    if not value:
        return "-"
    return ", ".join(sorted(set(value))) if isinstance(value, list | set | tuple) else str(value)
