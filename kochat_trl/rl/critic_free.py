"""Critic-free RL: TRL's maintained RLOOTrainer / GRPOTrainer (top-level `trl`), rewarded by our reward model."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

from transformers import TrainerCallback

from kochat_trl.models.shared_base import SharedBase
from kochat_trl.rl.models import place_on
from kochat_trl.run import engines

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
    from kochat_trl.config.trainer_switch import switch_parser

    return switch_parser(script_arguments, lambda name: critic_free_classes(name)[0], "rloo", trainer)


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
        from kochat_trl.data.templates import prompt_ids
        from kochat_trl.errors import DataError
        from kochat_trl.eval.rewards import score_responses

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
    (the reward model an adapter on it) and `peft_config` is None; the reference is its base with no adapter, as
    PPO's (`SharedBase.trainer_adds_no_adapter`: TRL's "ref" copy of the policy adapter is deleted)."""
    _, trainer_class = critic_free_classes(name)
    if shared_base is not None:
        shared_base.draw_policy_adapter()  # what TRL's get_peft_model would draw here
    with shared_base.trainer_adds_no_adapter() if shared_base is not None else nullcontext():
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
