"""The held-out evaluation every policy-improving stage reports (PPO, RLOO, GRPO, DPO, KTO, ORPO).

The SFT policy and the trained policy answer the same held-out prompts, sampled the same way with the same
seed; the stage-2 reward model and the rule-based judge score both sets of answers, and the KL of the trained
policy to the SFT policy is measured on its own answers. Same prompts, sampling, reward model and judge for
every method, so their numbers compare.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from kochat_trl import engines
from kochat_trl.rl.evaluation import (
    adapter_disabled_reference,
    policy_comparison,
    repeat_each,
    sample_and_score,
    sequence_kl,
)


@dataclass
class HeldOutEvaluation:
    """`queries` are the raw held-out prompts and `prompt_ids` their rendered token ids (one per query)."""

    tokenizer: Any
    reward_model: Any
    queries: Sequence[str]
    prompt_ids: Sequence[Sequence[int]]
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float
    seed: int
    missing_eos_penalty: float | None = None
    kl_bound: float | None = None
    _before: tuple[list[list[int]], list[float]] | None = field(default=None, repr=False)

    @property
    def prompts(self) -> list[list[int]]:
        return repeat_each(self.prompt_ids, self.samples_per_prompt)

    def _sample(self, policy: Any) -> tuple[list[list[int]], list[float]]:
        # Under ZeRO-3 every rank samples the same answers from the gathered weights (same seed).
        with engines.gathered(policy), engines.gathered(self.reward_model):
            return sample_and_score(
                policy,
                self.reward_model,
                self.tokenizer,
                self.prompts,
                self.max_new_tokens,
                self.temperature,
                self.seed,
                self.missing_eos_penalty,
            )

    def score_before(self, policy: Any) -> None:
        """The SFT policy's answers and rewards, before training changes it."""
        self._before = self._sample(policy)

    def compare(self, policy: Any, reference: Any, reference_ctx: Callable[[], Any]) -> dict[str, Any]:
        """The trained policy against the SFT policy: policy_comparison's metrics, with the KL to `reference`
        (computed inside `reference_ctx()`: the adapter disabled, or nothing for a separate model)."""
        if self._before is None:
            raise RuntimeError("score_before() must run before training")
        before, scores_before = self._before
        after, scores_after = self._sample(policy)
        with engines.gathered(policy), engines.gathered(reference) if reference is not policy else nullcontext():
            kl = sequence_kl(policy, reference, reference_ctx, self.prompts, after, self.temperature)
        return policy_comparison(
            self.tokenizer,
            self.queries,
            before,
            scores_before,
            after,
            scores_after,
            kl,
            self.kl_bound,
            self.samples_per_prompt,
        )


def held_out_summary(metrics: dict[str, Any]) -> str:
    """The console's account of a held-out comparison, the same for every stage: reward before -> after, the
    gain's standard error, and the KL to the SFT policy."""
    return (
        f"held-out reward {metrics['reward_before']:.3f} -> {metrics['reward_after']:.3f} "
        f"(gain ±{metrics['reward_gain_se']:.3f}), KL {metrics['kl']:.3f}"
    )


def trained_and_reference(trainer: Any, load_sft: Callable[[], Any]) -> tuple[Any, Any, Callable[[], Any]]:
    """After a Trainer-based stage: the trained policy, the SFT policy the KL is measured against, and the context
    to compute that one in: the policy with its LoRA adapter disabled, else the SFT model loaded again (`load_sft`)."""
    trained = trainer.accelerator.unwrap_model(trainer.model)
    reference = adapter_disabled_reference(trainer)
    return (trained, *reference) if reference else (trained, load_sft(), nullcontext)
