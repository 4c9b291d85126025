"""Generation: named decoding presets, batched answers, decoding metrics, a comparison report, chat.

Every prompt is rendered by the tokenizer's chat template (the one the model was trained with, saved in its
folder), like training did. Prompts are left-padded so a batch generates the same answers as one prompt at a
time; only the new text is returned.

Metrics tokenisation (documented because the numbers depend on it): distinct-n and the repeated
n-gram rate count whitespace-separated words (`str.split()`, Korean eojeol); mean length counts
the model tokenizer's generated tokens (before eos) and characters.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kochat_trl.errors import KochatError
from kochat_trl.judge import JUDGE_KEYS
from kochat_trl.templates import Message, prompt_text, saved_template_name

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
REPEAT_N = 2  # repeated n-gram rate counts word bigrams
# Default comparison prompts: the held-out split of bundled:ppo made like recipes/configs/tiny/ppo.yaml.
DEFAULT_PROMPTS_SOURCE, HELD_OUT_FRACTION, HELD_OUT_SEED, DEFAULT_PROMPT_COUNT = "bundled:ppo", 0.2, 42, 4


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


def _model_source_error(path: str, what: str) -> KochatError | None:
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

        from kochat_trl.modeling import load_causal_lm, load_tokenizer

        error = _model_source_error(str(model_path), "model")
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


# ---------------------------------------------------------------------------------------------
# Metrics


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[index : index + n]) for index in range(len(words) - n + 1)]


def distinct_n(answers: Sequence[str], n: int) -> float:
    """Unique word n-grams / all word n-grams, pooled over every answer (0.0 when there are none)."""
    grams = [gram for answer in answers for gram in _ngrams(answer.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(answers: Sequence[str], n: int = REPEAT_N) -> float:
    """Per answer, the share of its word n-grams already seen earlier in it; averaged over answers with any.

    Welleck et al. (2019)'s seq-rep-n: 1 - unique/total within one answer. 0.0 when no answer has an n-gram.
    """
    rates = []
    for answer in answers:
        grams = _ngrams(answer.split(), n)
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


@dataclass
class DecodingMetrics:
    distinct_1: float
    distinct_2: float
    repeated_ngram_rate: float
    mean_tokens: float
    mean_chars: float
    tokens_per_second: float
    mean_reward: float | None = None
    judge: dict[str, Any] | None = None  # kochat_trl.judge rates, when the prompts are known


def decoding_metrics(
    generation: Generation, rewards: Sequence[float] | None = None, prompts: Sequence[str] | None = None
) -> DecodingMetrics:
    """Diversity, repetition, length and speed of one strategy's answers (+ mean reward if scored, + the rule-based
    judge's rates when the `prompts` they answer are given)."""
    from kochat_trl.judge import judge_answers

    answers, count = generation.answers, max(len(generation.answers), 1)
    return DecodingMetrics(
        distinct_1=distinct_n(answers, 1),
        distinct_2=distinct_n(answers, 2),
        repeated_ngram_rate=repeated_ngram_rate(answers, REPEAT_N),
        mean_tokens=sum(generation.token_counts) / count,
        mean_chars=sum(len(answer) for answer in answers) / count,
        tokens_per_second=generation.generated_tokens / generation.seconds if generation.seconds > 0 else 0.0,
        mean_reward=sum(rewards) / len(rewards) if rewards else None,
        judge=judge_answers(prompts, answers) if prompts is not None else None,
    )


# ---------------------------------------------------------------------------------------------
# Comparison


@dataclass
class StrategyResult:
    strategy: str
    kwargs: dict[str, Any]
    answers: list[str]
    metrics: DecodingMetrics
    rewards: list[float] | None = None


@dataclass
class DecodingComparison:
    """Every strategy's answers to the same prompts; `render_markdown` turns it into decoding.md."""

    model: str
    template: str
    prompts: list[str]
    results: list[StrategyResult]
    max_new_tokens: int
    seed: int
    adapter: str | None = None
    reward_model: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


def default_prompts(count: int = DEFAULT_PROMPT_COUNT) -> list[str]:
    """The first `count` held-out bundled PPO prompts (the tiny PPO config's eval split)."""
    from kochat_trl.data import load_stage_data, to_dataset_dict

    rows = load_stage_data(DEFAULT_PROMPTS_SOURCE, "ppo").rows
    held_out = to_dataset_dict(rows, HELD_OUT_FRACTION, HELD_OUT_SEED)["eval"]
    return list(held_out["prompt"][:count])


def load_prompts(source: str, limit: int | None = None) -> list[str]:
    """Raw prompts from any layout the data module reads (prompt of each record)."""
    from kochat_trl.data import load_stage_data

    prompts = [row["prompt"] for row in load_stage_data(source, "ppo").rows]
    return prompts[:limit] if limit else prompts


def _load_reward(reward_model: str | tuple[Any, Any]) -> tuple[Any, Any]:
    if isinstance(reward_model, tuple):
        return reward_model
    from trl import ModelConfig

    from kochat_trl.modeling import load_reward_model, load_tokenizer

    args = ModelConfig(model_name_or_path=str(reward_model))
    try:
        tokenizer = load_tokenizer(args)
        return load_reward_model(args, tokenizer).eval(), tokenizer
    except OSError as error:
        raise KochatError(f"{reward_model}: cannot load the reward model ({error})".replace("\n", " ")) from None


def compare_decoding(
    model: str | Generator,
    prompts: Sequence[str] | None = None,
    strategies: Sequence[str] = tuple(DECODING_PRESETS),
    *,
    adapter: str | None = None,
    template: str | None = None,
    reward_model: str | tuple[Any, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    batch_size: int = 8,
) -> DecodingComparison:
    """Answer the same prompts with each strategy (each seeded with `seed`) and measure the answers.

    `model` is a model folder or a loaded `Generator`; `reward_model` a folder or a (model, tokenizer) pair that
    scores each (prompt, answer) conversation in its own chat template; the judge rates every answer.
    """
    strategies = check_strategies(strategies)
    if isinstance(reward_model, str) and (error := _model_source_error(reward_model, "reward model")):
        raise error  # before the policy loads: a typo should fail fast
    generator = model if isinstance(model, Generator) else Generator.load(model, adapter, template)
    prompts = list(prompts) if prompts is not None else default_prompts()
    if not prompts:
        raise KochatError("no prompts to compare decoding on")
    scorer = _load_reward(reward_model) if reward_model is not None else None
    texts = [generator.format(prompt) for prompt in prompts]
    results = []
    for strategy in strategies:
        generation = generator.generate(texts, strategy, overrides, max_new_tokens, seed, batch_size)
        rewards = None
        if scorer is not None:
            from kochat_trl.rewards import score_answers

            rewards = score_answers(scorer[0], scorer[1], prompts, generation.answers)
        results.append(
            StrategyResult(
                strategy,
                decoding_kwargs(strategy, overrides, max_new_tokens),
                generation.answers,
                decoding_metrics(generation, rewards, prompts),
                rewards,
            )
        )
    return DecodingComparison(
        model=model if isinstance(model, str) else str(getattr(generator.model, "name_or_path", "model")),
        template=generator.template_name or "none",
        prompts=prompts,
        results=results,
        max_new_tokens=max_new_tokens,
        seed=seed,
        adapter=adapter,
        overrides=dict(overrides or {}),
        reward_model=reward_model if isinstance(reward_model, str) else ("given" if reward_model else None),
    )


SUMMARY_COLUMNS = (
    "strategy",
    "mean reward",
    "distinct-1",
    "distinct-2",
    f"repeated {REPEAT_N}-gram rate",
    "mean tokens",
    "mean chars",
    "tokens/s",
    *(f"judge: {name}" for name in ("broken", "hangul", "polite", "on-topic", "repeats")),
)
# The same columns, short enough for a terminal.
SHORT_SUMMARY_COLUMNS = (
    "strategy",
    "reward",
    "dist-1",
    "dist-2",
    f"rep-{REPEAT_N}",
    "tokens",
    "chars",
    "tok/s",
    "broken",
    "hangul",
    "polite",
    "topic",
    "repeat",
)


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def summary_row(result: StrategyResult) -> list[str]:
    """One summary table row as text; the terminal table and the Markdown both use it."""
    metrics = result.metrics
    reward = "n/a" if metrics.mean_reward is None else f"{metrics.mean_reward:.4f}"
    return [
        result.strategy,
        reward,
        f"{metrics.distinct_1:.4f}",
        f"{metrics.distinct_2:.4f}",
        f"{metrics.repeated_ngram_rate:.4f}",
        f"{metrics.mean_tokens:.1f}",
        f"{metrics.mean_chars:.1f}",
        f"{metrics.tokens_per_second:.1f}",
        *(_rate((metrics.judge or {}).get(key)) for key in JUDGE_KEYS),
    ]


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>") or " "


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "---") -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *[align] * (len(header) - 1)]) + "|"]
    return lines + ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]


def render_markdown(result: DecodingComparison) -> str:
    """The comparison as Markdown: settings, a summary row per strategy, then each prompt's answers."""
    setup = f"Model `{result.model}`" + (f" + adapter `{result.adapter}`" if result.adapter else "")
    setup += f", template `{result.template}`, max_new_tokens {result.max_new_tokens}, seed {result.seed}"
    setup += f", reward model `{result.reward_model}`." if result.reward_model else ", no reward model."
    lines = ["# Decoding comparison", "", setup, "", "## Summary", ""]
    lines += _table(SUMMARY_COLUMNS, [summary_row(item) for item in result.results], "---:")
    lines += [
        "",
        f"distinct-n and repeated {REPEAT_N}-gram rate count whitespace-separated words; mean tokens "
        "counts the model tokenizer's tokens before eos; tokens/s = generated tokens / wall time. judge (rule-based, "
        "`kochat_trl.judge`): share of answers with a broken character (U+FFFD), mean Hangul share of letters, "
        "share ending in 합니다체, share naming the asked topic (prompts about a bundled topic), share repeating a "
        "word bigram.",
        "",
    ]
    lines += _table(
        ["strategy", "generate kwargs"], [[item.strategy, f"`{json.dumps(item.kwargs)}`"] for item in result.results]
    )
    lines += ["", "## Answers"]
    for index, prompt in enumerate(result.prompts):
        lines += ["", f"### {index + 1}. {prompt}", ""]
        lines += _table(["strategy", "answer"], [[item.strategy, item.answers[index]] for item in result.results])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Terminal chat

CHAT_HELP = "commands: /reset (clear history), /strategy NAME (switch decoding), /exit"


def _fit_history(generator: Generator, history: list[Message], max_new_tokens: int) -> str:
    """The formatted conversation, dropping the oldest turns while it would overflow the context."""
    limit = generator.context_limit()
    while True:
        text = generator.format(history)
        too_long = limit is not None and len(generator.tokenizer(text)["input_ids"]) + max_new_tokens > limit
        if not too_long or len(history) <= 1:
            return text
        del history[:2]  # the oldest user turn and its answer


def chat_loop(
    generator: Generator,
    input_stream: IO[str],
    output_stream: IO[str],
    strategy: str = DEFAULT_STRATEGY,
    overrides: dict[str, Any] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int | None = 0,
    prompt_marker: str = "> ",
) -> int:
    """Multi-turn chat over text streams until /exit, EOF or Ctrl-C; returns how many answers were given."""
    check_strategies([strategy])
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)  # once: a session is reproducible, yet each turn samples afresh

    def say(text: str) -> None:
        output_stream.write(text + "\n")
        output_stream.flush()

    history: list[Message] = []
    answers = 0
    say(f"chat with template {generator.template_name}, strategy {strategy}; {CHAT_HELP}")
    try:
        while True:
            output_stream.write(prompt_marker)
            output_stream.flush()
            line = input_stream.readline()
            if not line:  # EOF
                say("")
                break
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                break
            if text == "/reset":
                history.clear()
                say("(history cleared)")
            elif text.startswith("/strategy"):
                name = text.removeprefix("/strategy").strip()
                if name in DECODING_PRESETS:
                    strategy = name
                    say(f"(strategy: {strategy})")
                else:
                    say(f"unknown strategy {name!r}; presets: {', '.join(DECODING_PRESETS)}")
            elif text.startswith("/"):
                say(f"unknown command {text.split()[0]!r}; {CHAT_HELP}")
            else:
                history.append({"role": "user", "content": text})
                prompt = _fit_history(generator, history, max_new_tokens)
                answer = generator.generate([prompt], strategy, overrides, max_new_tokens).answers[0]
                history.append({"role": "assistant", "content": answer})
                answers += 1
                say(answer)
    except KeyboardInterrupt:
        say("")
    return answers
