"""The held-out evaluation every policy-improving stage reports (PPO, RLOO, GRPO, DPO, KTO, ORPO).

The SFT policy and the trained policy answer the same held-out prompts, sampled the same way with the same
seed; the stage-2 reward model and the rule-based judge score both sets of answers, and the KL of the trained
policy to the SFT policy is measured on its own answers. Same prompts, sampling, reward model and judge for
every method, so their numbers compare.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kochat_trl.eval.comparison import (
    adapter_disabled_reference,
    policy_comparison,
    repeat_each,
    sample_and_score,
    sequence_kl,
)
from kochat_trl.run import engines

CURVE_RATES = ("good_rate", "polite_rate", "on_topic_rate", "faithful_rate")


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

    def reduced(self, prompts: int, samples_per_prompt: int) -> HeldOutEvaluation:
        """The same evaluation on the first `prompts` held-out prompts, `samples_per_prompt` answers each."""
        return replace(
            self,
            queries=self.queries[:prompts],
            prompt_ids=self.prompt_ids[:prompts],
            samples_per_prompt=samples_per_prompt,
            _before=None,
        )

    def score_before(self, policy: Any) -> None:
        """The SFT policy's answers and rewards, before training changes it."""
        self._before = self._sample(policy)

    def _kl(self, policy: Any, reference: Any, reference_ctx: Callable[[], Any], answers: list[list[int]]) -> float:
        with engines.gathered(policy), engines.gathered(reference) if reference is not policy else nullcontext():
            return sequence_kl(policy, reference, reference_ctx, self.prompts, answers, self.temperature)

    def measure(self, policy: Any, reference: Any, reference_ctx: Callable[[], Any]) -> dict[str, Any]:
        """One point of the gold-against-proxy curve: the KL to `reference`, the mean reward (the proxy) and the
        judge's rates (the gold) of the policy's answers now. The global RNG is left as it was, so measuring
        mid-training does not change what training samples next."""
        from kochat_trl.eval.judge import judge_answers

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            answers, scores = self._sample(policy)
            kl = self._kl(policy, reference, reference_ctx, answers)
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]
        judged = judge_answers(repeat_each(self.queries, self.samples_per_prompt), texts)
        return {"kl": kl, "reward": sum(scores) / len(scores), **{key: judged[key] for key in CURVE_RATES}}

    def compare(self, policy: Any, reference: Any, reference_ctx: Callable[[], Any]) -> dict[str, Any]:
        """The trained policy against the SFT policy: policy_comparison's metrics, with the KL to `reference`
        (computed inside `reference_ctx()`: the adapter disabled, or nothing for a separate model)."""
        if self._before is None:
            raise RuntimeError("score_before() must run before training")
        before, scores_before = self._before
        after, scores_after = self._sample(policy)
        kl = self._kl(policy, reference, reference_ctx, after)
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
    """The console's account of a held-out comparison, the same for every stage: the judge's good and polite rates
    before -> after (seen topics), the reward before -> after with the gain's standard error, and the KL to SFT."""
    before, after = metrics["judge_before"], metrics["judge_after"]
    return (
        f"good {before['good_rate']:.2f} -> {after['good_rate']:.2f} "
        f"(polite {before['polite_rate']:.2f} -> {after['polite_rate']:.2f}), "
        f"held-out reward {metrics['reward_before']:.3f} -> {metrics['reward_after']:.3f} "
        f"(gain ±{metrics['reward_gain_se']:.3f}), KL {metrics['kl']:.3f}"
    )


def trained_and_reference(trainer: Any, load_sft: Callable[[], Any]) -> tuple[Any, Any, Callable[[], Any]]:
    """After a Trainer-based stage: the trained policy, the SFT policy the KL is measured against, and the context
    to compute that one in: the policy with its LoRA adapter disabled, else the SFT model loaded again (`load_sft`)."""
    trained = trainer.accelerator.unwrap_model(trainer.model)
    reference = adapter_disabled_reference(trainer)
    return (trained, *reference) if reference else (trained, load_sft(), nullcontext)
