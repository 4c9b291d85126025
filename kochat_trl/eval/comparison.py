"""The held-out measurements every RL stage reports: seeded sampling, the KL to the SFT policy, the comparison.

Sampled as PPO samples, scored by the stage-2 reward model, with the same metric names for PPO, RLOO, GRPO and the
preference stages (`kochat_trl.eval.held_out` runs them).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig


@torch.no_grad()
def sample_responses(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 64,
) -> list[list[int]]:
    """Sample one answer per prompt exactly as PPO samples (top_k 0, top_p 1, temperature), seeded.

    Prompts are left-padded so every answer starts right after its prompt; answers are returned
    cut after the first eos.
    """
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature + 1e-7,
        top_k=0,
        top_p=1.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
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
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
            )
            for row in output[:, width:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id) + 1]
                answers.append([token for token in row if token != tokenizer.pad_token_id])
    finally:
        model.train(was_training)
    return answers


@torch.no_grad()
def _response_logprob_sums(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    temperature: float,
    batch_size: int = 64,
) -> list[float]:
    """Per answer, sum_t log p(a_t | prompt, a_<t) at `temperature`; sequences right-padded, in batches."""
    device = next(model.parameters()).device
    sums: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        pairs = list(zip(prompt_ids[start : start + batch_size], response_ids[start : start + batch_size], strict=True))
        width = max(len(prompt) + len(response) for prompt, response in pairs)
        input_ids = torch.zeros((len(pairs), width), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        targets = torch.zeros_like(input_ids)  # target of position t is token t + 1; 0 where not an answer token
        answer = torch.zeros_like(input_ids, dtype=torch.bool)
        for row, (prompt, response) in enumerate(pairs):
            sequence = [*prompt, *response]
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
            first = len(prompt) - 1  # the position whose logits predict the first answer token
            targets[row, first : first + len(response)] = torch.tensor(response, dtype=torch.long)
            answer[row, first : first + len(response)] = True
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits / (temperature + 1e-7), -1)
        picked = logprobs.gather(2, targets.to(device)[..., None]).squeeze(2) * answer.to(device)
        sums.extend(picked.sum(1).cpu().tolist())
    return sums


def sequence_kl(
    policy: Any,
    reference: Any,
    reference_ctx: Any,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    temperature: float,
) -> float:
    """Mean over answers of sum_t log pi(a_t) - log ref(a_t): PPO's k1 KL on the policy's own samples."""
    kept = [(prompt, response) for prompt, response in zip(prompt_ids, response_ids, strict=True) if response]
    if not kept:
        return 0.0
    prompts, responses = [prompt for prompt, _ in kept], [response for _, response in kept]
    policy_sums = _response_logprob_sums(policy, prompts, responses, temperature)
    with reference_ctx():
        reference_sums = _response_logprob_sums(reference, prompts, responses, temperature)
    return sum(p - r for p, r in zip(policy_sums, reference_sums, strict=True)) / len(kept)


def adapter_disabled_reference(trainer: Any) -> tuple[Any, Any] | None:
    """(model, context factory) computing the SFT policy after a Trainer-based stage (RLOO, GRPO, DPO, KTO, ORPO):
    the trained LoRA policy with its adapter disabled, or None without LoRA."""
    policy = trainer.accelerator.unwrap_model(trainer.model)
    return (policy, policy.disable_adapter) if hasattr(policy, "disable_adapter") else None


def repeat_each(items: Sequence[Any], times: int) -> list[Any]:
    """Every item `times` times in a row: several seeded answers per held-out prompt, prompt-major."""
    return [item for item in items for _ in range(times)]


def sample_and_score(
    policy: Any,
    reward_model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    missing_eos_penalty: float | None = None,
) -> tuple[list[list[int]], list[float]]:
    """One seeded sample per prompt (`sample_responses`) and its reward (`score_responses`)."""
    from kochat_trl.eval.rewards import score_responses

    answers = sample_responses(policy, tokenizer, prompt_ids, max_new_tokens, temperature, seed)
    return answers, score_responses(reward_model, tokenizer, prompt_ids, answers, missing_eos_penalty)


def paired_standard_error(gains: Sequence[float]) -> float:
    """The standard error of the mean of per-answer reward gains (after - before, same prompt and seed).

    On the tiny default one answer's reward spans about -3 to 4, so 240 answers leave the mean gain uncertain by
    about 0.1, and 960 by about 0.05: a gain is only a gain when it clears a few of these.
    """
    return statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else 0.0


def paired_rate_gain_se(up: int, down: int, count: int) -> float:
    """The standard error of a judge rate's gain over `count` paired answers, `up` of which gained the verdict and
    `down` lost it: `paired_standard_error` of the per-answer gains, +1, -1 or 0."""
    return paired_standard_error([1.0] * up + [-1.0] * down + [0.0] * (count - up - down))


def policy_comparison(
    tokenizer: Any,
    queries: Sequence[str],
    before: Sequence[Sequence[int]],
    scores_before: Sequence[float],
    after: Sequence[Sequence[int]],
    scores_after: Sequence[float],
    kl: float | None,
    kl_bound: float | None,
    samples_per_prompt: int = 1,
    samples: int = 3,
) -> dict[str, Any]:
    """Held-out metrics of an RL run against its SFT policy (the same names for PPO, RLOO and GRPO).

    `before`/`after` hold `samples_per_prompt` answers per query, prompt-major (`repeat_each`); the
    win-rate and `reward_gain_se` (`paired_standard_error`) pair the i-th answer before with the i-th after.
    `judge_before` / `judge_after` are the rule-based judge's rates (`kochat_trl.eval.judge`) on the same answers;
    `samples` and `judge_flips` are `changed_answers`.
    """
    from kochat_trl.eval.judge import judge_answers

    count = len(scores_before)
    if count != len(queries) * samples_per_prompt:
        raise ValueError(f"{count} answers for {len(queries)} prompts x {samples_per_prompt} samples")
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_after, scores_before, strict=True)]
    gains = [a - b for a, b in zip(scores_after, scores_before, strict=True)]
    eos = tokenizer.eos_token_id

    def text(ids: Sequence[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    asked = repeat_each(queries, samples_per_prompt)
    texts_before, texts_after = [text(ids) for ids in before], [text(ids) for ids in after]
    return {
        "reward_before": sum(scores_before) / count,
        "reward_after": sum(scores_after) / count,
        "reward_gain_se": paired_standard_error(gains),
        "kl": kl,
        "kl_bound": kl_bound,
        "kl_within_bound": None if kl_bound is None or kl is None else kl <= kl_bound,
        "win_rate": sum(wins) / count,
        "eval_prompts": len(queries),
        "eval_samples_per_prompt": samples_per_prompt,
        "eos_rate_before": sum(eos in ids for ids in before) / count,
        "eos_rate_after": sum(eos in ids for ids in after) / count,
        "length_before": sum(map(len, before)) / count,
        "length_after": sum(map(len, after)) / count,
        "judge_before": judge_answers(asked, texts_before),
        "judge_after": judge_answers(asked, texts_after),
        **changed_answers(asked, texts_before, texts_after, scores_before, scores_after, samples),
    }


def changed_answers(
    prompts: Sequence[str],
    before: Sequence[str],
    after: Sequence[str],
    scores_before: Sequence[float],
    scores_after: Sequence[float],
    samples: int = 3,
) -> dict[str, Any]:
    """What a reader should see first: `samples` held-out answers of seen topics that training changed (those the
    judge now calls good first, one per prompt), then one answer to a topic SFT never saw, labelled `seen: false`;
    and `judge_flips`, how many paired answers of seen topics turned good and how many stopped being good."""
    from kochat_trl.eval.judge import flags, judge_answer

    pairs = []
    for index, (prompt, old, new) in enumerate(zip(prompts, before, after, strict=True)):
        judged_old, judged_new = judge_answer(prompt, old), judge_answer(prompt, new)
        pairs.append((index, prompt, judged_old, judged_new, old != new))
    seen = [pair for pair in pairs if pair[2].seen is not False]
    up = sum(not pair[2].good and pair[3].good for pair in seen)
    down = sum(pair[2].good and not pair[3].good for pair in seen)
    flips = {
        "answers": len(seen),
        "changed": sum(pair[4] for pair in seen),
        "became_good": up,
        "stopped_being_good": down,
        "good_gain": (up - down) / len(seen) if seen else 0.0,
        "good_gain_se": paired_rate_gain_se(up, down, len(seen)),
    }
    # Changed answers first, those that became good before the rest; then the prompt order.
    ranked = sorted(seen, key=lambda pair: (not pair[4], not (pair[3].good and not pair[2].good), pair[0]))
    chosen, prompts_used = [], set()
    for pair in ranked:
        if len(chosen) < samples and pair[1] not in prompts_used:
            chosen.append(pair)
            prompts_used.add(pair[1])
    chosen += [pair for pair in pairs if pair[2].seen is False][:1]
    return {
        "judge_flips": flips,
        "samples": [
            {
                "prompt": prompt,
                "seen": judged_old.seen is not False,
                "before": before[index],
                "after": after[index],
                "score_before": scores_before[index],
                "score_after": scores_after[index],
                "judge_before": flags(judged_old),
                "judge_after": flags(judged_new),
            }
            for index, prompt, judged_old, judged_new, _ in chosen
        ],
    }
