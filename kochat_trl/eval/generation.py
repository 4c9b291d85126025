"""Generation: named decoding presets, `--gen` overrides and the `Generator` that loads a model and answers prompts.

Every prompt is rendered by the tokenizer's chat template (the one the model was trained with, saved in its
folder), like training did. Prompts are left-padded so a batch generates the same answers as one prompt at a
time; only the new text is returned.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kochat_trl.data.templates import Message, prompt_text, saved_template_name
from kochat_trl.errors import KochatError

# Presets fix the knobs that define the strategy (do_sample, num_beams, temperature, top_k, top_p),
# so a model's own generation_config (say top_p 0.9) cannot leak into another preset. transformers
# samples with top_k 50 unless told otherwise, hence top_k 0 (= off) for plain and nucleus sampling.
DECODING_PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {"do_sample": False, "num_beams": 1},
    "beam": {"do_sample": False, "num_beams": 4, "no_repeat_ngram_size": 2, "early_stopping": True},
    "sampling": {"do_sample": True, "num_beams": 1, "temperature": 0.7, "top_k": 0, "top_p": 1.0},
    "top_k": {"do_sample": True, "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0},
    "top_p": {"do_sample": True, "num_beams": 1, "temperature": 1.0, "top_k": 0, "top_p": 0.9},
}
DEFAULT_STRATEGY = "greedy"
DEFAULT_MAX_NEW_TOKENS = 64


def _unknown_strategy(name: str) -> KochatError:
    return KochatError(f"unknown decoding strategy {name!r}; choose one of {', '.join(DECODING_PRESETS)}")


def check_strategies(names: Sequence[str]) -> list[str]:
    """The names as a list, or a KochatError naming the first unknown one."""
    for name in names:
        if name not in DECODING_PRESETS:
            raise _unknown_strategy(name)
    if not names:
        raise KochatError(f"no decoding strategy given; choose from {', '.join(DECODING_PRESETS)}")
    return list(names)


def parse_generate_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (CLI `--gen`) → `generate` kwargs; values are JSON when they parse, else text."""
    from transformers import GenerationConfig

    known = GenerationConfig()
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise KochatError(f"--gen {item!r}: expected KEY=VALUE, e.g. --gen repetition_penalty=1.2")
        if not hasattr(known, key):
            raise KochatError(f"--gen {item!r}: {key!r} is not a transformers GenerationConfig option")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def decoding_kwargs(
    strategy: str, overrides: dict[str, Any] | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> dict[str, Any]:
    """`generate` kwargs for a preset: max_new_tokens, then the preset, then the overrides."""
    if strategy not in DECODING_PRESETS:
        raise _unknown_strategy(strategy)
    overrides = dict(overrides or {})
    if overrides.get("num_return_sequences", 1) != 1:
        raise KochatError("num_return_sequences must be 1 here: each prompt gets exactly one answer")
    # max_length alongside max_new_tokens (ours or the model's generation_config) makes transformers warn
    # and ignore max_length: a user's max_length unsets max_new_tokens.
    length = {"max_new_tokens": None if "max_length" in overrides else max_new_tokens}
    return {**length, **DECODING_PRESETS[strategy], **overrides}


@dataclass
class Generation:
    """Answers to a list of prompts with what metrics need: token ids, counts and wall time."""

    answers: list[str]
    token_ids: list[list[int]]  # generated ids before eos (eos and padding removed)
    generated_tokens: int  # new tokens the model produced, each ending eos included
    seconds: float

    @property
    def token_counts(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]


def model_source_error(path: str, what: str) -> KochatError | None:
    """A KochatError when `path` is neither an existing folder nor a hub id, else None."""
    if Path(path).exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", path):  # a folder, or a hub id
        return None
    return KochatError(
        f"{path}: {what} folder not found; pass a folder saved with save_pretrained "
        "(e.g. runs/tiny/sft) or build one with `kochat-trl init-tiny OUTDIR`"
    )


class Generator:
    """A causal LM + left-padding tokenizer carrying its chat template, ready for batched `generate`."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @property
    def template_name(self) -> str | None:
        return saved_template_name(self.tokenizer)

    @classmethod
    def load(cls, model_path: str, adapter: str | None = None, template: str | None = None) -> Generator:
        """Load by path; `adapter` is a PEFT adapter folder (merged for speed). Prompts are formatted with the chat
        template saved with the tokenizer; `template` names another one (and says so when it differs)."""
        from trl import ModelConfig

        from kochat_trl.models.loading import load_causal_lm, load_tokenizer

        error = model_source_error(str(model_path), "model")
        if error:
            raise error
        if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
            raise KochatError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json); check --adapter")
        # A LoRA run saves the tokenizer it trained with (chat template, maybe an added pad token) by the adapter.
        tokenizer_path = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_path
        try:
            tokenizer = load_tokenizer(
                ModelConfig(model_name_or_path=str(tokenizer_path)), padding_side="left", template=template
            )
            model = load_causal_lm(ModelConfig(model_name_or_path=str(model_path)), tokenizer)
            if adapter is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except OSError as error:
            raise KochatError(f"{model_path}: cannot load the model ({error})".replace("\n", " ")) from None
        import torch

        if torch.cuda.is_available() and getattr(model, "hf_device_map", None) is None:
            model = model.to("cuda")
        return cls(model.eval(), tokenizer)

    def format(self, prompt: str | list[Message]) -> str:
        """A user prompt (or a conversation ending in a user turn) as the model's input text."""
        return prompt_text(self.tokenizer, prompt)

    def generate(
        self,
        texts: Sequence[str],
        strategy: str = DEFAULT_STRATEGY,
        overrides: dict[str, Any] | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        seed: int | None = None,
        batch_size: int = 8,
    ) -> Generation:
        """Answers to already formatted `texts`; `seed` (if given) is set first, so sampling is reproducible."""
        import torch
        from transformers import set_seed

        kwargs = decoding_kwargs(strategy, overrides, max_new_tokens)
        if seed is not None:
            set_seed(seed)
        eos_ids = self._eos_ids(kwargs.get("eos_token_id"))
        answers, token_ids, generated = [], [], 0
        device = next(self.model.parameters()).device
        start = time.perf_counter()
        for offset in range(0, len(texts), batch_size):
            # The chat template writes every special token it needs (a bos too): tokenized as apply_chat_template does.
            batch = self.tokenizer(
                list(texts[offset : offset + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False
            )
            batch = batch.to(device)
            try:
                with torch.no_grad():
                    output = self.model.generate(**batch, **kwargs)
            except (ValueError, TypeError) as error:  # transformers' verdict on impossible settings
                raise KochatError(f"generate rejected the {strategy} settings {kwargs}: {error}") from None
            for row in output[:, batch["input_ids"].shape[1] :].tolist():
                ids = next((row[:index] for index, token in enumerate(row) if token in eos_ids), None)
                generated += len(row) if ids is None else len(ids) + 1
                ids = row if ids is None else ids
                token_ids.append(ids)
                answers.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return Generation(answers, token_ids, generated, time.perf_counter() - start)

    def answer(self, prompt: str, strategy: str = DEFAULT_STRATEGY, **kwargs: Any) -> str:
        """The answer to one raw user prompt (formatted with the chat template)."""
        return self.generate([self.format(prompt)], strategy, **kwargs).answers[0]

    def context_limit(self) -> int | None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        return limit or (self.tokenizer.model_max_length if self.tokenizer.model_max_length < 1e9 else None)

    def _eos_ids(self, override: int | list[int] | None = None) -> set[int]:
        """Where answers end: an `eos_token_id` override, else the model's and the tokenizer's eos."""
        if override is not None:
            return set(override if isinstance(override, list) else [override])
        configured = self.model.generation_config.eos_token_id
        ids = set(configured if isinstance(configured, list) else [configured])
        ids.add(self.tokenizer.eos_token_id)
        return {token for token in ids if token is not None}
