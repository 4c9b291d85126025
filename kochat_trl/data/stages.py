"""Stage datasets for the trainers: Korean data (kochat_trl.data.layouts) as conversations for the chat template.

SFT and reward rows are conversational (lists of `{"role", "content"}` messages), so they are rendered with the
tokenizer's chat template, the same template PPO, generation and reward scoring format with: what SFT trains on is
exactly what the reward model scores and what PPO and generation feed the policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kochat_trl.data.layouts import LoadedData, load_stage_data, to_dataset_dict
from kochat_trl.data.templates import Message, answered_text, check_messages, prompt_ids, prompt_text, user_turn
from kochat_trl.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict


def _split(
    loaded: LoadedData, rows: list[dict[str, Any]], eval_fraction: float, seed: int, max_samples: int | None
) -> DatasetDict:
    from kochat_trl.run.console import say

    if max_samples is not None:
        rows = rows[:max_samples]
    say(loaded.summary())
    return to_dataset_dict(rows, eval_fraction, seed)


def _answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def answer_mask(tokenizer: Any, messages: list[Message]) -> tuple[list[int], list[int]]:
    """A conversation's token ids and its loss mask: 1 on every assistant answer and the eos that ends it, 0 on the
    rest (system and user turns, the markers that open an answer).

    What TRL's `assistant_only_loss` does with `{% generation %}` markers, here through our chat template with no
    markers in it (a saved template with them would not load in llama.cpp's Jinja): answer k is the text from the
    end of `messages[:k]` rendered with the generation prompt to the end of `messages[:k + 1]`, and a token is
    learned when its characters fall in such a span. For a single question this is TRL's prompt-completion
    `completion_mask`. A template that renders earlier turns differently once later turns follow (one that drops
    past reasoning, say) has no such spans and is refused.
    """
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = prompt_text(tokenizer, messages[:index]), answered_text(tokenizer, messages[: index + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise ValueError(
                f"the chat template renders answer {len(spans) + 1} differently once later turns follow, so its "
                "tokens cannot be told apart; train on single questions or use a kochat-trl template "
                "(template: kochatgpt)"
            )
        spans.append((len(before), len(through)))
    mask = [
        int(any(start < end and token_end > start and token_start < end for start, end in spans))
        for token_start, token_end in encoded["offset_mapping"]
    ]
    return encoded["input_ids"], mask


def sft_dataset(
    source: str, tokenizer: Any, eval_fraction: float, seed: int, max_samples: int | None = None
) -> DatasetDict:
    """Conversations tokenized with the chat template, the loss on every answer (`answer_mask`): `messages`,
    `input_ids` and `completion_mask`, which SFTTrainer applies with `completion_only_loss`. A single question and
    its answer is a conversation of one turn."""
    loaded = load_stage_data(source, "sft")
    rows = []
    for number, row in enumerate(loaded.rows, 1):
        messages = row["messages"] if "messages" in row else [*user_turn(row["prompt"]), *_answer(row["completion"])]
        try:
            check_messages(messages)
            if not any(message["role"] == "user" for message in messages[:-1]):
                raise ValueError("no user turn before the answer")
            input_ids, completion_mask = answer_mask(tokenizer, messages)
        except ValueError as error:
            raise DataError(f"{source}: conversation {number}: {error}") from None
        rows.append({"messages": messages, "input_ids": input_ids, "completion_mask": completion_mask})
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
