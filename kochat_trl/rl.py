"""The one seam to TRL's RL trainers: PPO (trl.experimental, 1.12 line) and helpers around it.

TRL removed PPOTrainer in 1.13. Everything that touches `trl.experimental` lives in this module,
so replacing the trainer later changes this file and nothing else.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from transformers import GenerationConfig, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as _ppo_module

__all__ = ["PPOConfig", "AdaptiveKLCallback", "build_ppo_trainer", "train_ppo", "reference_context",
           "sample_responses", "sequence_kl"]  # fmt: skip


class _LoggingPPOTrainer(PPOTrainer):
    """TRL's PPOTrainer plus the mean response length per update in its logs (TRL does not log it)."""

    _response_lengths: list[float]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        lengths = getattr(self, "_response_lengths", [])
        if lengths and "objective/kl" in logs:
            logs["val/response_length"] = sum(lengths) / len(lengths)
            self._response_lengths = []
        super().log(logs, *args, **kwargs)


@contextmanager
def _recording_response_lengths(trainer: _LoggingPPOTrainer) -> Iterator[None]:
    # PPOTrainer.train truncates every rollout after eos with this module-level function; wrapping it
    # is the only place the response lengths are visible. Restored on exit.
    original = _ppo_module.truncate_response
    trainer._response_lengths = []

    def truncate_and_record(stop_token_id: int, pad_token_id: int, responses: torch.Tensor) -> torch.Tensor:
        truncated = original(stop_token_id, pad_token_id, responses)
        trainer._response_lengths.append((truncated != pad_token_id).sum(1).float().mean().item())
        return truncated

    _ppo_module.truncate_response = truncate_and_record
    try:
        yield
    finally:
        _ppo_module.truncate_response = original


class AdaptiveKLCallback(TrainerCallback):
    """Adaptive KL coefficient (Ziegler et al. 2019): steer the measured KL towards `target`.

    TRL 1.12's PPO reads `args.kl_coef` at every update, so adjusting it after each logged update
    takes effect on the next rollout.
    """

    def __init__(self, target: float, horizon: int = 10000) -> None:
        self.target, self.horizon = target, horizon

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not logs or "objective/kl" not in logs:
            return
        error = max(-0.2, min(0.2, logs["objective/kl"] / self.target - 1))
        args.kl_coef *= 1 + error * args.batch_size / self.horizon
        logs["objective/kl_coef"] = args.kl_coef


def build_ppo_trainer(args: PPOConfig, tokenizer: Any, policy: Any, reward_model: Any, value_model: Any,
                      train_dataset: Any, eval_dataset: Any = None, peft_config: Any = None,
                      ref_model: Any = None, callbacks: Sequence[TrainerCallback] = ()) -> PPOTrainer:  # fmt: skip
    """TRL's PPOTrainer. With a LoRA `peft_config` and `ref_model=None` the reference is the policy
    with its adapter disabled: the SFT model itself, at no extra memory."""
    return _LoggingPPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_model,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
        callbacks=list(callbacks),
    )


def train_ppo(trainer: PPOTrainer) -> None:
    """`trainer.train()` without the cost of its per-update `gc.collect()` calls.

    PPOTrainer collects garbage twice per update; with every long-lived object frozen out of the
    collector's view that is cheap (on CPU it was 70 % of PPO time before).
    """
    gc.collect()
    gc.freeze()
    try:
        with _recording_response_lengths(trainer):
            trainer.train()
    finally:
        gc.unfreeze()


def reference_context(trainer: PPOTrainer):
    """Context in which `trainer.model.policy` computes the reference (adapter disabled), when LoRA."""
    return trainer.null_ref_context() if trainer.ref_model is None else nullcontext()


@torch.no_grad()
def sample_responses(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                     temperature: float, seed: int, batch_size: int = 64) -> list[list[int]]:  # fmt: skip
    """Sample one answer per prompt exactly as PPO samples (top_k 0, top_p 1, temperature), seeded.

    Prompts are left-padded so every answer starts right after its prompt; answers are returned
    cut after the first eos.
    """
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature + 1e-7,
                              top_k=0, top_p=1.0, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    answers: list[list[int]] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            batch = [list(ids) for ids in prompt_ids[start : start + batch_size]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in batch])
            attention_mask = (input_ids != tokenizer.pad_token_id).long()  # prompts never contain pad
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config)  # fmt: skip
            for row in output[:, width:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id) + 1]
                answers.append([token for token in row if token != tokenizer.pad_token_id])
    finally:
        model.train(was_training)
    return answers


@torch.no_grad()
def _response_logprobs(model: Any, prompt: Sequence[int], response: Sequence[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([[*prompt, *response]], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / (temperature + 1e-7)
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(response, device=ids.device)[:, None]).squeeze(1)


def sequence_kl(policy: Any, reference: Any, reference_ctx: Any, prompt_ids: Sequence[Sequence[int]],
                response_ids: Sequence[Sequence[int]], temperature: float) -> float:  # fmt: skip
    """Mean over answers of sum_t log pi(a_t) - log ref(a_t): PPO's k1 KL on the policy's own samples."""
    total, count = 0.0, 0
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        if not response:
            continue
        policy_logprobs = _response_logprobs(policy, prompt, response, temperature)
        with reference_ctx():
            reference_logprobs = _response_logprobs(reference, prompt, response, temperature)
        total += (policy_logprobs - reference_logprobs).sum().item()
        count += 1
    return total / max(count, 1)
