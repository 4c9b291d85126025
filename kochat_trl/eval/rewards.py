"""Scoring answers with a reward model the way it was trained, through its chat template.

The conversation is rendered by the tokenizer's chat template (prompt, answer, eos) and the score read at the last
token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


@torch.no_grad()
def score_token_sequences(
    model: Any, pad_token_id: int, sequences: Sequence[Sequence[int]], batch_size: int = 32
) -> list[float]:
    """Scalar reward per token sequence, read at its last token (sequences are right-padded here)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    try:
        for start in range(0, len(sequences), batch_size):
            batch = [list(sequence) for sequence in sequences[start : start + batch_size]]
            width = max(len(sequence) for sequence in batch)
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, sequence in enumerate(batch):
                input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
                attention_mask[row, : len(sequence)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
    finally:
        model.train(was_training)
    return scores


def score_conversations(
    model: Any, tokenizer: Any, conversations: Sequence[list[dict[str, str]]], batch_size: int = 32
) -> list[float]:
    """Scalar reward per conversation ending in an answer, rendered and tokenized exactly as RewardTrainer does
    with conversational pairs (`apply_chat_template`, whose assistant turn ends with eos)."""
    from kochat_trl.data.templates import conversation_ids

    sequences = [conversation_ids(tokenizer, messages) for messages in conversations]
    return score_token_sequences(model, tokenizer.pad_token_id, sequences, batch_size)


def score_answers(
    model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32
) -> list[float]:
    """Scalar reward of each `answer` to the user prompt beside it."""
    from kochat_trl.data.templates import answered

    conversations = [answered(prompt, answer) for prompt, answer in zip(prompts, answers, strict=True)]
    return score_conversations(model, tokenizer, conversations, batch_size)


def score_responses(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    missing_eos_penalty: float | None = None,
    batch_size: int = 32,
) -> list[float]:
    """Score generated answers as PPO does: prompt ids + answer ids cut after the first eos.

    An answer that never produced eos was cut off by the length limit: it is scored as is and,
    when `missing_eos_penalty` is set, that much is subtracted (TRL's PPO/RLOO rule).
    """
    eos_id = tokenizer.eos_token_id
    sequences, penalties = [], []
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        response = [token for token in response if token != tokenizer.pad_token_id]
        ended = eos_id in response
        if ended:
            response = response[: response.index(eos_id) + 1]
        sequences.append([*prompt, *response])
        penalties.append(0.0 if ended or missing_eos_penalty is None else missing_eos_penalty)
    scores = score_token_sequences(model, tokenizer.pad_token_id, sequences, batch_size)
    return [score - penalty for score, penalty in zip(scores, penalties, strict=True)]


def pairwise_accuracy(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], batch_size: int = 32) -> dict:
    """Accuracy (chosen scored above rejected) and mean margin over conversational preference rows."""
    chosen = score_conversations(model, tokenizer, [row["prompt"] + row["chosen"] for row in rows], batch_size)
    rejected = score_conversations(model, tokenizer, [row["prompt"] + row["rejected"] for row in rows], batch_size)
    margins = [better - worse for better, worse in zip(chosen, rejected, strict=True)]
    return {
        "accuracy": sum(margin > 0 for margin in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
        "pairs": len(margins),
    }
