"""Direct preference optimisation from ranked answers: TRL's DPO and KTO trainers, and ORPO (kochat_trl.rl.orpo).

The same ranking data as the reward model (kochat_trl.data.layouts's rm layout: every ordered pair of a ranking, ties
skipped) feeds DPO and ORPO as conversational preference pairs; KTO takes it unpaired: an answer that is
always preferred in its ranking is desirable, one that never is is undesirable. With LoRA the reference model
is the policy with its adapter disabled (no second copy); ORPO has no reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kochat_trl.errors import ConfigError

if TYPE_CHECKING:
    from datasets import DatasetDict

PREFERENCE_TRAINERS = ("dpo", "kto", "orpo")
# What each trainer's loss_type accepts in TRL 1.12 (DPOTrainer checks only when it computes the first loss).
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def preference_classes(name: str) -> tuple[type, type]:
    """(config class, trainer class) of DPO, KTO or ORPO."""
    if name == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    if name == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer
    if name == "orpo":
        from kochat_trl.rl.orpo import orpo_classes

        return orpo_classes()
    raise ConfigError(f"trainer must be one of {', '.join(PREFERENCE_TRAINERS)}, got {name!r}")


def preference_parser(script_arguments: type, trainer: str | None = None) -> Any:
    """`TrlParser` over (script_arguments, DPOConfig / KTOConfig / ORPOConfig, ModelConfig)."""
    from kochat_trl.config.trainer_switch import switch_parser

    return switch_parser(script_arguments, lambda name: preference_classes(name)[0], "dpo", trainer)


def check_settings(name: str, script_args: Any, training_args: Any) -> None:
    """What TRL would only refuse after the models are loaded, or never: the judging reward model, loss_type, and
    the judged prompts (`prompts_dataset`, read here: before prepare_run builds or deletes anything)."""
    from kochat_trl.data.layouts import load_stage_data

    if not script_args.reward_model_path:
        raise ConfigError("reward_model_path is not set; give stage 2's reward model folder (it judges the answers)")
    load_stage_data(script_args.prompts_dataset, "ppo")
    # beta's and the judging settings' ranges are checked before parsing (kochat_trl.config.ranges)
    loss_types = getattr(training_args, "loss_type", None)
    allowed = {"dpo": DPO_LOSS_TYPES, "kto": KTO_LOSS_TYPES}.get(name)
    if allowed is None or loss_types is None:
        return
    for loss_type in loss_types if isinstance(loss_types, list) else [loss_types]:
        if loss_type not in allowed:
            raise ConfigError(
                f"loss_type {loss_type!r} is not one {name.upper()}Trainer knows; choose from {', '.join(allowed)}"
            )


def preference_dataset(
    name: str, source: str, eval_fraction: float, seed: int, max_samples: int | None = None
) -> DatasetDict:
    """Conversational pairs `{prompt, chosen, rejected}` (DPO, ORPO) or unpaired `{prompt, completion, label}` (KTO)."""
    from kochat_trl.data.stages import reward_dataset

    pairs = reward_dataset(source, eval_fraction, seed, max_samples)
    if name != "kto":
        return pairs
    from datasets import Dataset, DatasetDict

    return DatasetDict({split: Dataset.from_list(unpaired(rows.to_list())) for split, rows in pairs.items()})


def unpaired(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """KTO's feedback from preference pairs: per prompt, an answer never rejected is desirable (label True), one
    never chosen undesirable (False); answers both chosen and rejected (the middle of a ranking) are left out."""
    chosen: dict[str, dict[str, Any]] = {}
    rejected: dict[str, dict[str, Any]] = {}
    for row in pairs:
        key = row["prompt"][0]["content"]
        chosen.setdefault(key, {}).setdefault(row["chosen"][0]["content"], row)
        rejected.setdefault(key, {}).setdefault(row["rejected"][0]["content"], row)
    rows = []
    for key in chosen.keys() | rejected.keys():
        prompt = next(iter({**chosen.get(key, {}), **rejected.get(key, {})}.values()))["prompt"]
        desirable = [answer for answer in chosen.get(key, {}) if answer not in rejected.get(key, {})]
        undesirable = [answer for answer in rejected.get(key, {}) if answer not in chosen.get(key, {})]
        for answer, label in [*((answer, True) for answer in desirable), *((answer, False) for answer in undesirable)]:
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": answer}], "label": label})
    return sorted(
        rows, key=lambda row: (row["prompt"][0]["content"], not row["label"], row["completion"][0]["content"])
    )


def build_trainer(
    name: str,
    args: Any,
    tokenizer: Any,
    policy: Any,
    train_dataset: Any,
    eval_dataset: Any = None,
    peft_config: Any = None,
    callbacks: Any = (),
) -> Any:
    """TRL's trainer for `name`; with a LoRA `peft_config` and no ref_model, DPO and KTO use the policy with its
    adapter disabled as the reference."""
    _, trainer_class = preference_classes(name)
    return trainer_class(
        model=policy,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks),
    )


def implicit_reward_metrics(evaluation: dict[str, float]) -> dict[str, float | None]:
    """DPO's (and ORPO's) implicit-reward accuracy and margin on the held-out pairs, from `trainer.evaluate()`."""
    return {
        "implicit_accuracy": evaluation.get("eval_rewards/accuracies"),
        "implicit_margin": evaluation.get("eval_rewards/margins"),
    }
