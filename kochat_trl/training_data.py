"""Stage datasets for the trainers: Korean data (kochat_trl.data) as conversations for the chat template.

SFT and reward rows are conversational (lists of `{"role", "content"}` messages), so TRL's trainers render
them with the tokenizer's chat template, the same template PPO, generation and reward scoring format
with: what SFT trains on is exactly what the reward model scores and what PPO and generation feed the
policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kochat_trl.data import LoadedData, load_stage_data, to_dataset_dict
from kochat_trl.errors import DataError
from kochat_trl.templates import check_messages, prompt_ids, user_turn

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict


def _split(
    loaded: LoadedData, rows: list[dict[str, Any]], eval_fraction: float, seed: int, max_samples: int | None
) -> DatasetDict:
    from kochat_trl.console import say

    if max_samples is not None:
        rows = rows[:max_samples]
    say(loaded.summary())
    return to_dataset_dict(rows, eval_fraction, seed)


def _answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def sft_dataset(source: str, eval_fraction: float, seed: int, max_samples: int | None = None) -> DatasetDict:
    """Conversational prompt-completion rows (loss on the completion only: the last answer and its eos)."""
    loaded = load_stage_data(source, "sft")
    rows = []
    for row in loaded.rows:
        if "messages" in row:
            messages = row["messages"]
            try:
                check_messages(messages)
            except ValueError as error:
                raise DataError(f"{source}: conversation {len(rows) + 1}: {error}") from None
            if not any(message["role"] == "user" for message in messages[:-1]):
                raise DataError(f"{source}: conversation {len(rows) + 1}: no user turn before the answer")
            rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
        else:
            rows.append({"prompt": user_turn(row["prompt"]), "completion": _answer(row["completion"])})
    return _split(loaded, rows, eval_fraction, seed, max_samples)


def reward_dataset(source: str, eval_fraction: float, seed: int, max_samples: int | None = None) -> DatasetDict:
    """Conversational preference pairs with an explicit prompt (the chat template ends each answer with eos)."""
    loaded = load_stage_data(source, "rm")
    rows = [
        {"prompt": user_turn(row["prompt"]), "chosen": _answer(row["chosen"]), "rejected": _answer(row["rejected"])}
        for row in loaded.rows
    ]
    return _split(loaded, rows, eval_fraction, seed, max_samples)


def prompt_dataset(
    source: str, tokenizer: Any, eval_fraction: float, seed: int, max_samples: int | None = None
) -> DatasetDict:
    """RL prompts: the raw `query`, the conversational `prompt` (RLOO/GRPO render it) and its chat-template
    `input_ids` (PPO takes pre-tokenised prompts)."""
    loaded = load_stage_data(source, "ppo")
    rows = []
    for row in loaded.rows:
        conversation = user_turn(row["prompt"])
        rows.append({"query": row["prompt"], "prompt": conversation, "input_ids": prompt_ids(tokenizer, conversation)})
    return _split(loaded, rows, eval_fraction, seed, max_samples)


def rl_prompts(script_args: Any, training_args: Any, tokenizer: Any) -> tuple[DatasetDict, Dataset]:
    """The RL recipes' prompts (`prompt_dataset`, built on the main process first) and the first
    `eval_prompts` held-out rows, on which the policy is scored before and after training."""
    from accelerate import PartialState

    with PartialState().main_process_first():
        dataset = prompt_dataset(
            script_args.dataset_name, tokenizer, script_args.eval_fraction, training_args.seed, script_args.max_samples
        )
    held_out = dataset["eval"].select(range(min(script_args.eval_prompts, len(dataset["eval"]))))
    return dataset, held_out


def held_out_prompts(
    source: str, tokenizer: Any, eval_fraction: float, seed: int, count: int
) -> tuple[list[str], list[list[int]]]:
    """The first `count` held-out prompts of `source` (raw, and rendered as ids): the prompts the RL recipes judge
    on, for a stage that trains on something else (the preference recipes train on rankings)."""
    from accelerate import PartialState

    with PartialState().main_process_first():
        held_out = prompt_dataset(source, tokenizer, eval_fraction, seed)["eval"]
    held_out = held_out.select(range(min(count, len(held_out))))
    return list(held_out["query"]), list(held_out["input_ids"])
