"""Stage 3 without a critic: TRL's RLOO or GRPO against the reward model, a KL penalty (`beta`) to the SFT model.

Same inputs as recipes/ppo.py: policy = the SFT result with a new LoRA adapter (reference = adapter
disabled), reward = stage 2's model (with `shared_base: true`, its LoRA adapter on the policy's own base),
prompts = the PPO layout as conversations (chat template). Each prompt
is sampled `num_generations` times; RLOO's baseline is the other samples' mean reward, GRPO's their
group mean (and spread). The reward model scores prompt ids + answer ids cut after eos, less
`missing_eos_penalty` when an answer never stopped (`kochat_trl.rl.critic_free.RewardModelReward`).

    kochat-trl rloo --config tiny/rloo.yaml
    kochat-trl grpo --config tiny/grpo.yaml
    python -m kochat_trl.recipes.rl --config tiny/rloo.yaml --trainer grpo   # GRPO, same settings
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kochat_trl.config.arguments import RLArguments


@dataclass
class RLScriptArguments(RLArguments):
    trainer: str = field(
        default="rloo",
        metadata={"help": "TRL trainer: rloo (RLOOTrainer) or grpo (GRPOTrainer).", "choices": ["rloo", "grpo"]},
    )
    reward_model_path: str | None = field(default=None, metadata={"help": "Stage 2's reward model folder."})
    missing_eos_penalty: float | None = field(
        default=1.0, metadata={"help": "Subtracted from the reward of an answer that never produced eos."}
    )
    shared_base: bool = field(
        default=False,
        metadata={
            "help": "The reward model as an adapter on the policy's frozen SFT base (reward_model_path a LoRA "
            "adapter trained on model_name_or_path)."
        },
    )
    # Several answers per prompt by default: they are the group RLOO/GRPO sample anyway.
    eval_samples_per_prompt: int = field(
        default=4, metadata={"help": "Answers sampled per held-out prompt (a rare bad sample moves one less)."}
    )


def main(script_args, training_args, model_args):
    from functools import cache

    from kochat_trl.data.stages import rl_prompts
    from kochat_trl.errors import ConfigError
    from kochat_trl.eval import overoptimization
    from kochat_trl.eval.held_out import HeldOutEvaluation, held_out_summary, trained_and_reference
    from kochat_trl.models import loading
    from kochat_trl.recipes import steps
    from kochat_trl.rl.critic_free import RewardModelReward, build_critic_free_trainer
    from kochat_trl.rl.models import critic_free_parameter_counts, load_critic_free_models, place_on
    from kochat_trl.run import console, progress, resume

    if not script_args.reward_model_path:
        raise ConfigError("reward_model_path is not set; give stage 2's reward model folder")
    plan = steps.prepare_run(script_args, training_args, model_args, stage="ppo")  # prompts: the PPO layout
    tokenizer = loading.load_tokenizer(model_args, padding_side="left", template=script_args.template)
    dataset, held_out = rl_prompts(script_args, training_args, tokenizer)

    device = training_args.device  # the "before" samples are drawn before the trainer places the policy
    models = load_critic_free_models(script_args, training_args, model_args, tokenizer)
    policy, reward_model = place_on(models.policy, device), place_on(models.reward, device)

    # The SFT policy's held-out answers, sampled as the trainer samples (top_k 0, top_p 1), fixed seed.
    evaluation = HeldOutEvaluation(
        tokenizer,
        reward_model,
        held_out["query"],
        held_out["input_ids"],
        script_args.eval_samples_per_prompt,
        training_args.max_completion_length,
        training_args.temperature,
        training_args.seed,
        script_args.missing_eos_penalty,
        script_args.kl_bound,
    )
    evaluation.score_before(policy)

    reward = RewardModelReward(reward_model, tokenizer, script_args.missing_eos_penalty)
    trainer = build_critic_free_trainer(
        script_args.trainer,
        training_args,
        tokenizer,
        policy,
        reward,
        train_dataset=dataset["train"].select_columns(["prompt"]),
        peft_config=models.policy_lora,
        callbacks=steps.training_callbacks(),
        shared_base=models.shared,
    )
    # KL to the SFT policy: the adapter disabled under LoRA, else the SFT model loaded again (once).
    sft_copy = cache(lambda: place_on(loading.load_causal_lm(model_args, tokenizer), device))
    curve = overoptimization.attach_curve(
        trainer, evaluation, script_args, lambda: trained_and_reference(trainer, sft_copy)
    )
    progress.attach_progress(trainer, script_args.trainer, ["reward", "kl"], script_args.verbose)
    resume.train(trainer, plan.resume_from)
    trainer.save_model(training_args.output_dir)

    trained, reference, reference_ctx = trained_and_reference(trainer, sft_copy)
    metrics = {
        **evaluation.compare(trained, reference, reference_ctx),
        **overoptimization.finish_curve(
            curve, script_args.trainer, training_args.output_dir, trainer.is_world_process_zero()
        ),
        "trainer": script_args.trainer,
        "train_reward_last": steps.last_logged(trainer.state.log_history, "reward"),
        "train_kl_last": steps.last_logged(trainer.state.log_history, "kl"),  # TRL's: per token, not per answer
        # Sampled answers: every optimizer step uses a global batch of them, each batch num_iterations times.
        "completions": trainer.state.global_step
        * training_args.per_device_train_batch_size
        * training_args.world_size
        * training_args.gradient_accumulation_steps
        // training_args.num_iterations,
        "num_generations": training_args.num_generations,
        "params": critic_free_parameter_counts(models, trained),
        "policy_base": model_args.model_name_or_path,
        "reward_model": script_args.reward_model_path,
        **steps.shared_metrics(trainer, tokenizer),
    }
    steps.finish_run(
        trainer,
        metrics,
        ["reward", "kl", "completions/mean_length", "completions/clipped_ratio", "entropy"],
        script_args,
        training_args,
        model_args,
    )
    console.say(
        f"{script_args.trainer}: {held_out_summary(metrics)}, win-rate {metrics['win_rate']:.2f}; "
        f"saved to {training_args.output_dir}"
    )
    return metrics


def make_parser(trainer: str | None = None):
    from kochat_trl.rl.critic_free import critic_free_parser

    return critic_free_parser(RLScriptArguments, trainer)  # RLOOConfig or GRPOConfig, as --trainer/trainer: say


if __name__ == "__main__":
    from kochat_trl.recipes.steps import run_recipe

    run_recipe(make_parser, main)
