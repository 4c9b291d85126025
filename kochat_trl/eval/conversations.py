"""The held-out multi-turn evaluation: does a model answer the question asked, not an earlier one?

A model answers each held-out conversation (`resources/conversations.json`: 2- and 3-turn conversations about topics
SFT saw, every question in a form SFT never saw) turn by turn, as a person chatting with it would: its own answers
become the history the next question is asked in, formatted by the chat template. The judge rates every answer
against its own question; the rates are reported per turn (turn 2 and turn 3 apart) and for the last answer of each
conversation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from kochat_trl.data.templates import Message
from kochat_trl.eval.generation import DEFAULT_MAX_NEW_TOKENS, Generator

RESULT_FILE = "conversations.json"  # in a run folder: every model's answers and rates (evaluate_conversations)
# The rates a multi-turn table shows, in order (on topic first: the question this evaluation asks).
TURN_RATES = ("on_topic_rate", "faithful_rate", "good_rate", "polite_rate")


def held_out_conversations() -> list[list[str]]:
    """The bundled held-out conversations, each a list of its questions."""
    from importlib import resources

    text = (resources.files("kochat_trl") / "resources" / "conversations.json").read_text(encoding="utf-8")
    return [record["questions"] for record in json.loads(text)]


def converse(
    generator: Generator,
    conversations: Sequence[Sequence[str]],
    strategy: str = "greedy",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
) -> list[list[str]]:
    """The model's answers to every question of every conversation, each asked after the model's own earlier
    answers (all conversations' turn k in one batch)."""
    histories: list[list[Message]] = [[] for _ in conversations]
    for turn in range(max((len(questions) for questions in conversations), default=0)):
        active = [index for index, questions in enumerate(conversations) if len(questions) > turn]
        for index in active:
            histories[index].append({"role": "user", "content": conversations[index][turn]})
        texts = [generator.format(histories[index]) for index in active]
        answers = generator.generate(texts, strategy, None, max_new_tokens, seed).answers
        for index, answer in zip(active, answers, strict=True):
            histories[index].append({"role": "assistant", "content": answer})
    return [[message["content"] for message in history if message["role"] == "assistant"] for history in histories]


def turn_rates(conversations: Sequence[Sequence[str]], answers: Sequence[Sequence[str]]) -> dict[str, Any]:
    """The judge's rates per turn (`turn_1`, `turn_2`, ...) and over each conversation's last answer (`last`), each
    against its own question."""
    from kochat_trl.eval.judge import judge_answers

    rates = {}
    for turn in range(max((len(questions) for questions in conversations), default=0)):
        pairs = [(qs[turn], said[turn]) for qs, said in zip(conversations, answers, strict=True) if len(qs) > turn]
        rates[f"turn_{turn + 1}"] = _plain(judge_answers(*zip(*pairs, strict=True)))
    last = [(qs[-1], said[-1]) for qs, said in zip(conversations, answers, strict=True)]
    rates["last"] = _plain(judge_answers(*zip(*last, strict=True)))
    return rates


def _plain(judged: dict[str, Any]) -> dict[str, Any]:
    return {key: judged[key] for key in (*TURN_RATES, "answers")}


def evaluate_conversations(
    models: dict[str, str], conversations: Sequence[Sequence[str]] | None = None, seed: int = 0
) -> dict[str, Any]:
    """Each model (name -> folder) through the held-out conversations, greedy: per model its per-turn rates and its
    answers, in the order of `conversations` (the bundled held-out set by default)."""
    conversations = [list(questions) for questions in (conversations or held_out_conversations())]
    result: dict[str, Any] = {"questions": conversations, "models": {}}
    for name, path in models.items():
        answers = converse(Generator.load(path), conversations, seed=seed)
        result["models"][name] = {"rates": turn_rates(conversations, answers), "answers": answers}
    return result


def conversation_lines(result: dict[str, Any], example: int | None = None) -> list[str]:
    """Markdown: the per-turn table for every model, then one three-turn conversation answered by each model."""
    names = list(result["models"])
    headers = " | ".join(key.removesuffix("_rate").replace("_", " ") for key in TURN_RATES)
    lines = [
        f"| model | turn | conversations | {headers} |",
        "|---|---|---:|" + "---:|" * len(TURN_RATES),
    ]
    for name in names:
        for turn, rates in result["models"][name]["rates"].items():
            values = " | ".join("n/a" if rates[key] is None else f"{rates[key]:.3f}" for key in TURN_RATES)
            lines.append(f"| {name} | {turn.replace('_', ' ')} | {rates['answers']} | {values} |")
    questions = result["questions"]
    if example is None:
        example = next((index for index, qs in enumerate(questions) if len(qs) == 3), 0)
    lines += ["", f"One held-out conversation (#{example + 1}), answered turn by turn by each model:", ""]
    for turn, question in enumerate(questions[example]):
        lines.append(f"{turn + 1}. **{question}**")
        for name in names:
            lines.append(f"   - {name}: {result['models'][name]['answers'][example][turn]}")
    return lines
