"""Direct preference optimisation recipe: TRL's DPO (the default), KTO or ORPO on ranked answers, no RL loop.

`--trainer dpo|kto|orpo` turns the SFT policy's preferences towards the ranked answers, with no reward model.

Pairs come from any ranking layout (KoChatGPT's completion_0..N + ranking: every ordered pair, ties skipped);
KTO takes the best-ranked answers as desirable and the worst-ranked as undesirable. With LoRA the reference is
the policy with its adapter disabled; ORPO has none. Judged like PPO and RLOO: the SFT and the trained policy
answer the same held-out prompts, scored by the stage-2 reward model (`reward_model_path`) and the rule-based
judge, plus the KL to the SFT policy and DPO's own implicit-reward accuracy on held-out pairs.

    kochat-trl dpo --config tiny/dpo.yaml
    kochat-trl dpo --config tiny/kto.yaml     # or --trainer kto with dpo.yaml's settings
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m kochat_trl.recipes.dpo \
        --config polyglot-ko-1.3b/dpo.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kochat_trl.config.arguments import KochatArguments


@dataclass
class PreferenceScriptArguments(KochatArguments):
    trainer: str = field(
        default="dpo",
        metadata={
            "help": "TRL trainer: dpo (DPOTrainer), kto (KTOTrainer) or orpo (ORPOTrainer).",
            "choices": ["dpo", "kto", "orpo"],
        },
    )
    dataset_name: str = field(default="bundled:rm", metadata={"help": "Ranked answers (any ranking/pairs layout)."})
    reward_model_path: str | None = field(default=None, metadata={"help": "Stage 2's reward model, for the judging."})
    prompts_dataset: str = field(default="bundled:ppo", metadata={"help": "Prompts whose held-out split is judged."})
    prompts_eval_fraction: float = field(default=0.2, metadata={"help": "Held-out share of prompts_dataset."})
    eval_prompts: int = field(default=64, metadata={"help": "Held-out prompts for reward before/after training."})
    eval_samples_per_prompt: int = field(default=4, metadata={"help": "Answers sampled per held-out prompt."})
    eval_temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the held-out answers."})
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Length limit of the held-out answers."})
    missing_eos_penalty: float | None = field(
        default=1.0, metadata={"help": "Subtracted from the reward of a held-out answer that never produced eos."}
    )
    kl_bound: float | None = field(default=None, metadata={"help": "Held-out KL reported as kl_within_bound."})


def main(script_args, training_args, model_args):
    from kochat_trl.config import checks
    from kochat_trl.data.stages import held_out_prompts
    from kochat_trl.eval.held_out import HeldOutEvaluation, held_out_summary, trained_and_reference
    from kochat_trl.models import loading, lora
    from kochat_trl.recipes import steps
    from kochat_trl.rl import preference
    from kochat_trl.rl.models import place_on
    from kochat_trl.run import console, progress, resume

    preference.check_settings(script_args.trainer, script_args, training_args)
    checks.check_model_path("reward_model_path", script_args.reward_model_path)
    plan = steps.prepare_run(
        script_args, training_args, model_args, stage="rm"
    )  # the ranking data, read as the RM reads it
    tokenizer = loading.load_tokenizer(model_args, template=script_args.template)
    dataset = preference.preference_dataset(
        script_args.trainer,
        script_args.dataset_name,
        script_args.eval_fraction,
        training_args.seed,
        script_args.max_samples,
    )
    queries, prompt_ids = held_out_prompts(
        script_args.prompts_dataset,
        tokenizer,
        script_args.prompts_eval_fraction,
        training_args.seed,
        script_args.eval_prompts,
    )

    device = training_args.device  # the "before" answers are drawn before the trainer places the policy
    policy = place_on(loading.load_causal_lm(model_args, tokenizer, training_args.gradient_checkpointing), device)
    reward_model = place_on(
        loading.load_reward_model(loading.at_path(model_args, script_args.reward_model_path), tokenizer), device
    )
    evaluation = HeldOutEvaluation(
        tokenizer,
        reward_model,
        queries,
        prompt_ids,
        script_args.eval_samples_per_prompt,
        script_args.eval_max_new_tokens,
        script_args.eval_temperature,
        training_args.seed,
        script_args.missing_eos_penalty,
        script_args.kl_bound,
    )
    evaluation.score_before(policy)

    trainer = preference.build_trainer(
        script_args.trainer,
        training_args,
        tokenizer,
        policy,
        dataset["train"],
        dataset.get("eval"),
        peft_config=lora.build_peft_config(model_args, policy, "CAUSAL_LM"),
        callbacks=steps.training_callbacks(),
    )
    progress.attach_progress(trainer, script_args.trainer, ["loss", "rewards/margins"], script_args.verbose)
    resume.train(trainer, plan.resume_from)
    held_out_pairs = trainer.evaluate() if "eval" in dataset else {}
    trainer.save_model(training_args.output_dir)

    # KL to the SFT policy: the adapter disabled under LoRA, else the SFT model loaded again.
    trained, reference, reference_ctx = trained_and_reference(
        trainer, lambda: place_on(loading.load_causal_lm(model_args, tokenizer), device)
    )
    policy_trainable, policy_total = loading.trainable_parameter_share(trained)
    metrics = {
        **evaluation.compare(trained, reference, reference_ctx),
        **preference.implicit_reward_metrics(held_out_pairs),
        "trainer": script_args.trainer,
        "beta": training_args.beta,
        "loss_type": getattr(training_args, "loss_type", None),
        "train_rows": len(dataset["train"]),
        "eval_rows": len(dataset["eval"]) if "eval" in dataset else 0,
        "params": {
            "policy": policy_total,
            "policy_trainable": policy_trainable,
            "reference_extra": 0 if reference is trained or script_args.trainer == "orpo" else policy_total,
        },
        "trainable_params": policy_trainable,
        "policy_base": model_args.model_name_or_path,
        "reward_model": script_args.reward_model_path,
        **steps.shared_metrics(trainer, tokenizer),
    }
    steps.finish_run(
        trainer,
        metrics,
        ["loss", "rewards/margins", "rewards/accuracies", "eval_loss", "eval_rewards/accuracies"],
        script_args,
        training_args,
        model_args,
    )
    console.say(
        f"{script_args.trainer}: {held_out_summary(metrics)}, implicit-reward accuracy "
        f"{console.number(metrics['implicit_accuracy'])}; saved to {training_args.output_dir}"
    )
    return metrics


def make_parser(trainer: str | None = None):
    from kochat_trl.rl.preference import preference_parser

    return preference_parser(PreferenceScriptArguments, trainer)  # DPOConfig, KTOConfig or ORPOConfig


if __name__ == "__main__":
    from kochat_trl.recipes.steps import run_recipe

    run_recipe(make_parser, main)
