"""The one seam to TRL's RL trainers: PPO (trl.experimental, 1.12 line) and helpers around it.

TRL removed PPOTrainer in 1.13. Everything that touches `trl.experimental` lives in this module,
so replacing the trainer later changes this file and nothing else.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from transformers import GenerationConfig, TrainerCallback

from kochat_trl import engines, resume
from kochat_trl.console import known_prints_dropped, known_warnings_ignored
from kochat_trl.shared_base import SharedBase, SharedBaseReference

with known_warnings_ignored():  # TRL's one-time "you are importing from trl.experimental" (console.KNOWN_WARNINGS)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as _ppo_module

__all__ = [
    "PPOConfig",
    "AdaptiveKLCallback",
    "build_ppo_trainer",
    "train_ppo",
    "reference_context",
    "sample_responses",
    "sequence_kl",
    "CRITIC_FREE_TRAINERS",
    "critic_free_classes",
    "critic_free_parser",
    "orpo_classes",
    "place_on",
    "RewardModelReward",
    "build_critic_free_trainer",
    "adapter_disabled_reference",
    "repeat_each",
    "sample_and_score",
    "policy_comparison",
]


class _LoggingPPOTrainer(SharedBaseReference, engines.DeepSpeedPPOFixes, PPOTrainer):
    """TRL's PPOTrainer plus the mean response length per update in its logs (TRL does not log it), and
    checkpoints it can resume from (TRL's cannot, trl#2657): the value model is saved with the policy,
    and `train(resume_from_checkpoint)` restores weights, optimizer, scheduler, counters, log, RNG and
    the data position (see `kochat_trl.resume`). Under DeepSpeed, `engines.DeepSpeedPPOFixes`; with one shared
    base, its reference context (`kochat_trl.shared_base`)."""

    _response_lengths: list[float]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        lengths = getattr(self, "_response_lengths", [])
        if lengths and "objective/kl" in logs:
            logs["val/response_length"] = sum(lengths) / len(lengths)
            self._response_lengths = []
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # TRL saves only the policy. The value model goes in first: trainer_state.json, written last by
        # super(), then marks the whole checkpoint complete.
        if self.args.should_save:
            value_model = self.accelerator.unwrap_model(self.model).value_model
            resume.save_model_weights(
                value_model, resume.checkpoint_dir(self.args.output_dir, self.state.global_step) / resume.VALUE_SUBDIR
            )
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | os.PathLike | None = None) -> None:
        original_loader, total = self.dataloader, self.args.num_total_batches
        done, restore_rng, continue_callback = 0, None, None
        if resume_from_checkpoint is not None:
            saved = resume.read_trainer_state(resume_from_checkpoint)
            done = saved["global_step"]
            unwrapped = self.accelerator.unwrap_model(self.model)
            resume.load_model_weights(unwrapped.policy, resume_from_checkpoint)
            resume.load_model_weights(unwrapped.value_model, os.path.join(resume_from_checkpoint, resume.VALUE_SUBDIR))
            resume.load_optimizer_and_scheduler(self.optimizer, self.lr_scheduler, resume_from_checkpoint)
            continue_callback = resume.ContinueFromCheckpoint(saved, total)
            self.callback_handler.callbacks.insert(0, continue_callback)  # before AdaptiveKL, progress bars
            restore_rng = partial(self._load_rng_state, str(resume_from_checkpoint))
        # TRL's loop counts updates from 1 and resets its counters in train(); it runs the remaining ones.
        self.args.num_total_batches = total - done
        self.dataloader = resume.EpochSeededBatches(
            original_loader, self.args.seed, skip=done, before_first=restore_rng
        )
        try:
            super().train()
        finally:
            self.dataloader, self.args.num_total_batches = original_loader, total
            if continue_callback is not None:
                self.callback_handler.callbacks.remove(continue_callback)


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

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A resumed run continues with the coefficient the interrupted one had reached.
        args.kl_coef = next(
            (entry["objective/kl_coef"] for entry in reversed(state.log_history) if "objective/kl_coef" in entry),
            args.kl_coef,
        )

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not logs or "objective/kl" not in logs:
            return
        error = max(-0.2, min(0.2, logs["objective/kl"] / self.target - 1))
        args.kl_coef *= 1 + error * args.batch_size / self.horizon
        logs["objective/kl_coef"] = args.kl_coef
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            # Trainer.log appended a copy of `logs` before calling us: record the coefficient there too.
            state.log_history[-1]["objective/kl_coef"] = args.kl_coef


def build_ppo_trainer(
    args: PPOConfig,
    tokenizer: Any,
    policy: Any,
    reward_model: Any,
    value_model: Any,
    train_dataset: Any,
    eval_dataset: Any = None,
    peft_config: Any = None,
    ref_model: Any = None,
    callbacks: Sequence[TrainerCallback] = (),
    shared_base: SharedBase | None = None,
) -> PPOTrainer:
    """TRL's PPOTrainer. With a PEFT policy (or a LoRA `peft_config`) and `ref_model=None` the reference is the policy
    with its adapter disabled: the SFT model itself, at no extra memory. With `shared_base` the policy,
    reward and value models are its adapters (`kochat_trl.shared_base.build`) and `peft_config` is None."""
    if shared_base is not None:
        shared_base.draw_policy_adapter()  # what TRL's get_peft_model would draw here
    trainer = _LoggingPPOTrainer(
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
    trainer.shared_base = shared_base
    _fix_for_multiple_processes(trainer)
    return trainer


def _fix_for_multiple_processes(trainer: PPOTrainer) -> None:
    """Two TRL 1.12 PPO bugs that only show with more than one process (DDP)."""
    # PPO reads `self.model.policy` on the model accelerate prepared (trl#2375): under DDP that is a
    # DistributedDataParallel without `policy`, so the LoRA reference forward and `null_ref_context`
    # fail, and `save_model` would save policy + value model. A plain attribute (not a registered
    # submodule: DDP's parameters and state_dict stay as they are) points it at the unwrapped policy.
    wrapped = trainer.model
    if not hasattr(wrapped, "policy"):
        object.__setattr__(wrapped, "policy", trainer.accelerator.unwrap_model(wrapped).policy)
    # PPOTrainer skips Trainer.__init__, which sets this; transformers 5's `_save` reads it on every rank
    # but the writer. PPO never loads a model sharded by transformers.
    trainer.is_distributed_loading_by_transformers = False


def train_ppo(trainer: PPOTrainer, resume_from_checkpoint: str | os.PathLike | None = None) -> None:
    """`trainer.train()` without the cost of its per-update `gc.collect()` calls; continues from
    `resume_from_checkpoint` (a `checkpoint-N` folder of an earlier run) when given.

    PPOTrainer collects garbage twice per update; with every long-lived object frozen out of the
    collector's view that is cheap (on CPU it was 70 % of PPO time before).
    """
    gc.collect()
    gc.freeze()
    try:
        with _recording_response_lengths(trainer), known_prints_dropped():
            trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    finally:
        gc.unfreeze()


def save_value_model(trainer: PPOTrainer, folder: str | os.PathLike) -> None:
    """The trained value model (and the tokenizer) in `folder`; call on every rank (ZeRO-3 gathers)."""
    value_model = trainer.accelerator.unwrap_model(trainer.model).value_model
    engines.save_pretrained(value_model, folder, trainer.is_world_process_zero())
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(folder)


def reference_context(trainer: PPOTrainer):
    """Context in which `trainer.model.policy` computes the reference (adapter disabled), when LoRA."""
    return trainer.null_ref_context() if trainer.ref_model is None else nullcontext()


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


# Critic-free RL: TRL's maintained RLOOTrainer / GRPOTrainer (top-level `trl`) with our reward model,
# and the held-out evaluation every RL recipe (PPO, RLOO, GRPO) reports with the same metric names.

CRITIC_FREE_TRAINERS = ("rloo", "grpo")


def critic_free_classes(name: str) -> tuple[type, type]:
    """(config class, trainer class) of TRL's RLOO or GRPO."""
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from kochat_trl.errors import ConfigError

    classes = {"rloo": (RLOOConfig, RLOOTrainer), "grpo": (GRPOConfig, GRPOTrainer)}
    if name not in classes:
        raise ConfigError(f"trainer must be one of {', '.join(classes)}, got {name!r}")
    return classes[name]


def critic_free_parser(script_arguments: type, trainer: str | None = None) -> Any:
    """`TrlParser` over (script_arguments, RLOOConfig or GRPOConfig, ModelConfig), as `--trainer` / `trainer:` say."""
    from kochat_trl.trainer_switch import switch_parser

    return switch_parser(script_arguments, lambda name: critic_free_classes(name)[0], "rloo", trainer)


def orpo_classes() -> tuple[type, type]:
    """(ORPOConfig, ORPOTrainer): TRL 1.12 keeps ORPO in trl.experimental, which only this module imports."""
    with known_warnings_ignored():
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer


def place_on(model: Any, device: Any) -> Any:
    """`model` on `device`; k-bit models stay where they were loaded (device_map) since they cannot move."""
    return model if getattr(model, "hf_device_map", None) else model.to(device)


class RewardModelReward:
    """A reward function for RLOO/GRPO (`reward_funcs=`) that scores token ids with our reward model.

    Given the reward model itself, TRL decodes prompt + completion with `skip_special_tokens=True` and
    re-tokenizes, so the reward model never sees eos: an answer that stops scores like a cut-off one and the
    policy unlearns stopping. This scores what the policy generated instead: the conversational prompt
    rendered and tokenized as the trainers do (`apply_chat_template` with the generation prompt), plus TRL's
    `completion_ids` (cut after the first eos), less `missing_eos_penalty` when no eos came (`score_responses`).
    """

    def __init__(
        self, model: Any, tokenizer: Any, missing_eos_penalty: float | None = None, batch_size: int = 32
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.missing_eos_penalty, self.batch_size = missing_eos_penalty, batch_size
        self.__name__ = "reward_model"  # TRL logs rewards/<__name__>/mean

    def __call__(self, prompts: Sequence[Any], completion_ids: Sequence[Sequence[int]], **_: Any) -> list[float]:
        from kochat_trl.errors import DataError
        from kochat_trl.rewards import score_responses
        from kochat_trl.templates import prompt_ids

        if prompts and isinstance(prompts[0], str):
            raise DataError("RewardModelReward takes conversational prompts (lists of messages), not strings")
        ids = [prompt_ids(self.tokenizer, prompt) for prompt in prompts]  # as RLOO/GRPOTrainer tokenize them
        # Under ZeRO-3 the reward model is sharded (zero.Init) and no engine runs it: every rank scores its
        # own completions with the gathered weights (all ranks call the reward function at every step).
        with engines.gathered(self.model):
            return score_responses(
                self.model, self.tokenizer, ids, completion_ids, self.missing_eos_penalty, self.batch_size
            )


def build_critic_free_trainer(
    name: str,
    args: Any,
    tokenizer: Any,
    policy: Any,
    reward: RewardModelReward,
    train_dataset: Any,
    peft_config: Any = None,
    callbacks: Sequence[TrainerCallback] = (),
    shared_base: SharedBase | None = None,
) -> Any:
    """TRL's RLOOTrainer or GRPOTrainer on conversational prompts, rewarded by `reward`. With a LoRA `peft_config`
    the reference is the policy with its adapter disabled (no copy). With `shared_base` the policy is its PEFT model
    (the reward model an adapter on it) and `peft_config` is None; TRL then keeps the reference as a "ref" copy of
    the new policy adapter."""
    _, trainer_class = critic_free_classes(name)
    if shared_base is not None:
        shared_base.draw_policy_adapter()  # what TRL's get_peft_model would draw here
    with shared_base.copies_draw_nothing() if shared_base is not None else nullcontext():
        trainer = trainer_class(
            model=policy,
            reward_funcs=[reward],
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=list(callbacks),
        )
    # TRL places reward *models* on the device; the model inside a reward function is ours to place.
    place_on(reward.model, trainer.accelerator.device)
    return trainer


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
    from kochat_trl.rewards import score_responses

    answers = sample_responses(policy, tokenizer, prompt_ids, max_new_tokens, temperature, seed)
    return answers, score_responses(reward_model, tokenizer, prompt_ids, answers, missing_eos_penalty)


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
    win-rate pairs the i-th answer before with the i-th after. `judge_before` / `judge_after` are the rule-based
    judge's rates (`kochat_trl.judge`) on the same answers.
    """
    from kochat_trl.judge import judge_answers

    count = len(scores_before)
    if count != len(queries) * samples_per_prompt:
        raise ValueError(f"{count} answers for {len(queries)} prompts x {samples_per_prompt} samples")
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_after, scores_before, strict=True)]
    eos = tokenizer.eos_token_id

    def text(ids: Sequence[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    first = slice(None, None, samples_per_prompt)  # each prompt's first answer
    asked = repeat_each(queries, samples_per_prompt)
    return {
        "reward_before": sum(scores_before) / count,
        "reward_after": sum(scores_after) / count,
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
        "judge_before": judge_answers(asked, [text(ids) for ids in before]),
        "judge_after": judge_answers(asked, [text(ids) for ids in after]),
        "samples": [
            {"prompt": query, "before": text(b), "after": text(a), "score_before": sb, "score_after": sa}
            for query, b, a, sb, sa in zip(
                queries, before[first], after[first], scores_before[first], scores_after[first], strict=True
            )
        ][:samples],
    }
