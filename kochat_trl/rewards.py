"""Scoring text with a reward model: the same way it was trained (prompt + answer + eos)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


@torch.no_grad()
def reward_scores(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 32) -> list[float]:
    """Scalar reward per full text (template-formatted prompt + completion); eos appended if missing.

    RewardTrainer trains on `prompt + answer + eos` and the score is read at the last non-pad token,
    so scoring without eos would read a position the model never learned to score.
    """
    eos = tokenizer.eos_token or ""
    texts = [text if text.endswith(eos) else text + eos for text in texts]
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    scores: list[float] = []
    try:
        device = next(model.parameters()).device
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)  # fmt: skip
            scores.extend(model(**batch).logits[:, 0].float().cpu().tolist())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return scores


def pairwise_accuracy(model: Any, tokenizer: Any, rows: Sequence[dict[str, str]], batch_size: int = 32) -> dict:
    """Accuracy (chosen scored above rejected) and mean margin over formatted preference rows."""
    chosen = reward_scores(model, tokenizer, [row["prompt"] + row["chosen"] for row in rows], batch_size)
    rejected = reward_scores(model, tokenizer, [row["prompt"] + row["rejected"] for row in rows], batch_size)
    margins = [better - worse for better, worse in zip(chosen, rejected, strict=True)]
    return {
        "accuracy": sum(margin > 0 for margin in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
        "pairs": len(margins),
    }
