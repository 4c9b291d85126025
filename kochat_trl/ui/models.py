"""The models of a run, loaded lazily and once, and what the page asks of them: compare answers, chat.

Every prompt is formatted by the model's own chat template through `Generator` (`apply_chat_template`); answers
are generated exactly as `kochat-trl generate` generates them (same defaults: max_new_tokens 64, seed 0), each
scored by the run's reward model as compare-decoding scores (prompt, answer) and judged by `kochat_trl.eval.judge`.
One lock serialises generation: seeding is global, so two requests must not interleave. Every request is
bounded by `kochat_trl.ui.limits` before anything is generated: the page is reachable by whoever reaches its port.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from kochat_trl.data.templates import Message
from kochat_trl.errors import KochatError
from kochat_trl.eval.generation import DEFAULT_MAX_NEW_TOKENS, Generator, check_strategies, parse_generate_overrides
from kochat_trl.eval.judge import flags, judge_answer
from kochat_trl.ui.limits import MAX_HISTORY_MESSAGES, check_numbers, check_options, check_options_text, check_text
from kochat_trl.ui.run_folder import RunFolder

EMPTY_PROMPT = "Type a prompt first (or pick one of the held-out prompts)."
EMPTY_MESSAGE = "Type a message first."
DEFAULT_SEED = 0  # = `kochat-trl generate --seed` default
# transformers.set_seed is process-wide: one lock for every cache of the process (a Reload makes a new cache).
GENERATION_LOCK = threading.Lock()


class ModelCache:
    """Generators and the reward model of one run, each loaded on first use and kept; `loads` counts loads."""

    def __init__(
        self,
        run: RunFolder,
        load_generator: Callable[..., Generator] | None = None,
        load_reward: Callable[[str], tuple[Any, Any]] | None = None,
    ) -> None:
        self.run = run
        self._load_generator = load_generator or Generator.load
        self._load_reward = load_reward
        self._generators: dict[str, Generator] = {}
        self._reward: tuple[Any, Any] | None = None
        self._loading = threading.Lock()
        self.generation_lock = GENERATION_LOCK
        self.loads: Counter[str] = Counter()

    def generator(self, name: str) -> Generator:
        with self._loading:
            if name not in self._generators:
                entry = self.run.model(name)
                self._generators[name] = self._load_generator(
                    str(entry.model_path), str(entry.adapter) if entry.adapter else None
                )
                self.loads[name] += 1
            return self._generators[name]

    def reward(self) -> tuple[Any, Any] | None:
        """(model, tokenizer) of the run's rm/, or None when the run has no finished reward model."""
        path = self.run.reward_model
        if path is None:
            return None
        with self._loading:
            if self._reward is None:
                if self._load_reward is None:
                    from kochat_trl.eval.decoding import _load_reward

                    self._load_reward = _load_reward
                self._reward = self._load_reward(str(path))
                self.loads["rm"] += 1
            return self._reward


def parse_options(text: str | None) -> dict[str, Any]:
    """The page's generate options: `KEY=VALUE` per line (or comma-separated), as `--gen` parses them, limited to
    the keywords and ranges of `limits.GENERATE_OPTIONS`."""
    return check_options(parse_generate_overrides(check_options_text(text or "")))


def _checked(strategy: str, max_new_tokens: int | float | None, seed: int | float | None) -> tuple[int, int]:
    check_strategies([strategy])
    return check_numbers(
        DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens, DEFAULT_SEED if seed is None else seed
    )


def compare(
    cache: ModelCache,
    prompt: str | None,
    strategy: str = "greedy",
    overrides: dict[str, Any] | None = None,
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS,
    seed: int | None = DEFAULT_SEED,
    models: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Every model's answer to `prompt`: [{model, answer, reward, judge}] in the run's order (base, sft, ppo, ...).

    `reward` is the run's reward-model score of (prompt, answer), None without rm/; `judge` the rule-based flags.
    """
    prompt = check_text(prompt or "", "prompt")
    if not prompt:
        raise KochatError(EMPTY_PROMPT)
    max_new_tokens, seed = _checked(strategy, max_new_tokens, seed)
    overrides = check_options(dict(overrides or {}))
    names = list(models) if models is not None else cache.run.model_names()
    if not names:
        raise KochatError(f"{cache.run.path}: no trained model to answer yet; run the pipeline first")
    with cache.generation_lock:
        answers = [
            cache.generator(name).answer(
                prompt, strategy, overrides=overrides, max_new_tokens=max_new_tokens, seed=seed
            )
            for name in names
        ]
        scorer = cache.reward()
        rewards: list[float | None] = [None] * len(answers)
        if scorer is not None:
            from kochat_trl.eval.rewards import score_answers

            rewards = list(score_answers(scorer[0], scorer[1], [prompt] * len(answers), answers))
    return [
        {"model": name, "answer": answer, "reward": reward, "judge": flags(judge_answer(prompt, answer))}
        for name, answer, reward in zip(names, answers, rewards, strict=True)
    ]


def chat_reply(
    cache: ModelCache,
    model: str,
    history: Sequence[Message],
    message: str | None,
    strategy: str = "greedy",
    overrides: dict[str, Any] | None = None,
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS,
    seed: int | None = DEFAULT_SEED,
) -> tuple[list[Message], str, str | None]:
    """The conversation with `message` and the model's answer appended, the exact text the model was given (the
    conversation rendered by its chat template, oldest turns dropped while it would overflow the context) and a
    note saying what was dropped (None when nothing was)."""
    from kochat_trl.eval.chat import fit_history

    message = check_text(message or "", "message")
    if not message:
        raise KochatError(EMPTY_MESSAGE)
    max_new_tokens, seed = _checked(strategy, max_new_tokens, seed)
    overrides = check_options(dict(overrides or {}))
    turns = [{"role": turn["role"], "content": turn["content"]} for turn in history[-MAX_HISTORY_MESSAGES:]]
    turns.append({"role": "user", "content": message})
    with cache.generation_lock:
        generator = cache.generator(model)
        text, note = fit_history(generator, list(turns), max_new_tokens)  # a copy: the page keeps every turn
        answer = generator.generate([text], strategy, overrides, max_new_tokens, seed).answers[0]
    return [*turns, {"role": "assistant", "content": answer}], text, note


def template_info(cache: ModelCache, model: str) -> tuple[str, str]:
    """The name and the Jinja source of the chat template `model` was trained with (saved with its tokenizer)."""
    generator = cache.generator(model)
    return generator.template_name or "none", generator.tokenizer.chat_template or ""
