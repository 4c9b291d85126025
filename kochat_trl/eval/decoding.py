"""The decoding comparison: answer metrics, `compare_decoding` over the presets and its decoding.md report.

Metrics tokenisation (documented because the numbers depend on it): distinct-n and the repeated
n-gram rate count whitespace-separated words (`str.split()`, Korean eojeol); mean length counts
the model tokenizer's generated tokens (before eos) and characters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kochat_trl.errors import KochatError
from kochat_trl.eval.generation import (
    DECODING_PRESETS,
    DEFAULT_MAX_NEW_TOKENS,
    Generation,
    Generator,
    check_strategies,
    decoding_kwargs,
    model_source_error,
)
from kochat_trl.eval.judge import JUDGE_KEYS

REPEAT_N = 2  # repeated n-gram rate counts word bigrams
# Default comparison prompts: the held-out split of bundled:ppo made like recipes/configs/tiny/ppo.yaml.
DEFAULT_PROMPTS_SOURCE, HELD_OUT_FRACTION, HELD_OUT_SEED, DEFAULT_PROMPT_COUNT = "bundled:ppo", 0.2, 42, 4


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
    judge: dict[str, Any] | None = None  # kochat_trl.eval.judge rates, when the prompts are known


def decoding_metrics(
    generation: Generation, rewards: Sequence[float] | None = None, prompts: Sequence[str] | None = None
) -> DecodingMetrics:
    """Diversity, repetition, length and speed of one strategy's answers (+ mean reward if scored, + the rule-based
    judge's rates when the `prompts` they answer are given)."""
    from kochat_trl.eval.judge import judge_answers

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
    from kochat_trl.data.layouts import load_stage_data, to_dataset_dict

    rows = load_stage_data(DEFAULT_PROMPTS_SOURCE, "ppo").rows
    held_out = to_dataset_dict(rows, HELD_OUT_FRACTION, HELD_OUT_SEED)["eval"]
    return list(held_out["prompt"][:count])


def load_prompts(source: str, limit: int | None = None) -> list[str]:
    """Raw prompts from any layout the data module reads (prompt of each record)."""
    from kochat_trl.data.layouts import load_stage_data

    prompts = [row["prompt"] for row in load_stage_data(source, "ppo").rows]
    return prompts[:limit] if limit else prompts


def _load_reward(reward_model: str | tuple[Any, Any]) -> tuple[Any, Any]:
    if isinstance(reward_model, tuple):
        return reward_model
    from trl import ModelConfig

    from kochat_trl.models.loading import load_reward_model, load_tokenizer

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
    if isinstance(reward_model, str) and (error := model_source_error(reward_model, "reward model")):
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
            from kochat_trl.eval.rewards import score_answers

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


# One column per judge rate, in JUDGE_KEYS' order (the order summary_row writes them): (Markdown, terminal) labels.
JUDGE_LABELS = {
    "good_rate": ("good", "good"),
    "polite_rate": ("polite", "polite"),
    "on_topic_rate": ("on-topic", "topic"),
    "faithful_rate": ("faithful", "faithful"),
    "broken_rate": ("broken", "broken"),
    "hangul_share": ("hangul", "hangul"),
    "repeat_rate": ("repeats", "repeat"),
}
assert tuple(JUDGE_LABELS) == JUDGE_KEYS
SUMMARY_COLUMNS = (
    "strategy",
    "mean reward",
    "distinct-1",
    "distinct-2",
    f"repeated {REPEAT_N}-gram rate",
    "mean tokens",
    "mean chars",
    "tokens/s",
    *(f"judge: {label}" for label, _ in JUDGE_LABELS.values()),
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
    *(short for _, short in JUDGE_LABELS.values()),
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
        "`kochat_trl.eval.judge`): share of answers with a broken character (U+FFFD), mean Hangul share of letters, "
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
