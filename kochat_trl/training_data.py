"""Stage datasets for the trainers: Korean data (kochat_trl.data) formatted with the shared template.

Every stage formats prompts through the same `PromptTemplate`, so what SFT trains on is exactly
what the reward model scores and what PPO and generation feed the policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kochat_trl.data import LoadedData, load_stage_data, to_dataset_dict
from kochat_trl.templates import PromptTemplate, get_template

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict


def _split(loaded: LoadedData, rows: list[dict[str, Any]], eval_fraction: float, seed: int,
           max_samples: int | None) -> DatasetDict:  # fmt: skip
    from kochat_trl.runs import is_main_process

    if max_samples is not None:
        rows = rows[:max_samples]
    if is_main_process():
        print(f"[kochat-trl] {loaded.summary()}")
    return to_dataset_dict(rows, eval_fraction, seed)


def sft_dataset(source: str, template: PromptTemplate, tokenizer: Any, eval_fraction: float, seed: int,
                max_samples: int | None = None) -> DatasetDict:  # fmt: skip
    """Prompt-completion rows (loss on the completion only); conversations train on their last answer."""
    loaded = load_stage_data(source, "sft")
    rows = []
    for row in loaded.rows:
        if "messages" in row:
            rows.append(template.split_conversation(row["messages"], tokenizer))
        else:
            rows.append({
                "prompt": template.format_prompt(row["prompt"], tokenizer),
                "completion": template.format_completion(row["completion"]),
            })  # fmt: skip
    return _split(loaded, rows, eval_fraction, seed, max_samples)


def reward_dataset(source: str, template: PromptTemplate, tokenizer: Any, eval_fraction: float, seed: int,
                   max_samples: int | None = None) -> DatasetDict:  # fmt: skip
    """Preference pairs with an explicit prompt; RewardTrainer appends eos to both answers."""
    loaded = load_stage_data(source, "rm")
    rows = [
        {
            "prompt": template.format_prompt(row["prompt"], tokenizer),
            "chosen": template.format_completion(row["chosen"]),
            "rejected": template.format_completion(row["rejected"]),
        }
        for row in loaded.rows
    ]
    return _split(loaded, rows, eval_fraction, seed, max_samples)


def prompt_dataset(source: str, template: PromptTemplate, tokenizer: Any, eval_fraction: float, seed: int,
                   max_samples: int | None = None) -> DatasetDict:  # fmt: skip
    """Formatted prompts plus `input_ids` (PPO takes pre-tokenised prompts; the raw prompt is kept)."""
    loaded = load_stage_data(source, "ppo")
    rows = []
    for row in loaded.rows:
        text = template.format_prompt(row["prompt"], tokenizer)
        # Default special tokens, as TRL's SFT and reward trainers tokenize (bos for Llama-style models).
        rows.append({"query": row["prompt"], "prompt": text, "input_ids": tokenizer(text)["input_ids"]})
    return _split(loaded, rows, eval_fraction, seed, max_samples)


def rl_prompts(script_args: Any, training_args: Any, tokenizer: Any) -> tuple[DatasetDict, Dataset]:
    """The RL recipes' prompts (`prompt_dataset` with the run's template, built on the main process first) and
    the first `eval_prompts` held-out rows, on which the policy is scored before and after training."""
    from accelerate import PartialState

    with PartialState().main_process_first():
        dataset = prompt_dataset(script_args.dataset_name, get_template(script_args.template), tokenizer,
                                 script_args.eval_fraction, training_args.seed, script_args.max_samples)  # fmt: skip
    held_out = dataset["eval"].select(range(min(script_args.eval_prompts, len(dataset["eval"]))))
    return dataset, held_out
