"""Stage 3 of RLHF: PPO against the reward model, a KL penalty keeping the policy close to the SFT model.

Policy: the SFT result (a full model, or base + SFT adapter merged in memory) with a new LoRA
adapter; the reference is the same model with that adapter disabled (`ref_model=None`), so it costs
no memory. Reward model: stage 2's, frozen. Value model: initialised from the reward model (LoRA on
it when `use_peft`; a LoRA reward adapter itself trains on). With `shared_base: true` the reward and value
models are adapters on the policy's own frozen base (`kochat_trl.models.shared_base`): one base instead of three.
Prompts come from the PPO layout, rendered by the chat template, pre-tokenised
and left-padded; answers stop at eos.

    kochat-trl ppo --config tiny/ppo.yaml
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m kochat_trl.recipes.ppo \
        --config polyglot-ko-1.3b/ppo.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kochat_trl.config.arguments import RLArguments


@dataclass
class PPOScriptArguments(RLArguments):
    value_model_path: str | None = field(
        default=None, metadata={"help": "Value model initialisation; defaults to reward_model_path."}
    )
    kl_target: float | None = field(
        default=None, metadata={"help": "Adapt kl_coef so the per-answer KL approaches this value (None: fixed)."}
    )
    shared_base: bool = field(
        default=False,
        metadata={
            "help": "Policy, reference, reward and value as adapters on one frozen SFT base (reward_model_path "
            "a LoRA adapter trained on model_name_or_path)."
        },
    )


def main(script_args, training_args, model_args):
    from kochat_trl.data.stages import rl_prompts
    from kochat_trl.eval import overoptimization
    from kochat_trl.eval.held_out import HeldOutEvaluation, held_out_summary
    from kochat_trl.models import loading
    from kochat_trl.recipes import steps
    from kochat_trl.rl import ppo
    from kochat_trl.rl.models import load_ppo_models, parameter_counts
    from kochat_trl.run import console, progress

    plan = steps.prepare_run(script_args, training_args, model_args, stage="ppo")
    tokenizer = loading.load_tokenizer(model_args, padding_side="left", template=script_args.template)
    dataset, held_out = rl_prompts(script_args, training_args, tokenizer)

    models = load_ppo_models(script_args, training_args, model_args, tokenizer)
    policy, reward_model, value_model = models.policy, models.reward, models.value

    # The SFT policy's held-out answers, sampled exactly as PPO samples, fixed seed.
    evaluation = HeldOutEvaluation(
        tokenizer,
        reward_model,
        held_out["query"],
        held_out["input_ids"],
        script_args.eval_samples_per_prompt,
        training_args.response_length,
        training_args.temperature,
        training_args.seed,
        training_args.missing_eos_penalty,
        script_args.kl_bound,
    )
    evaluation.score_before(policy)

    callbacks = [ppo.AdaptiveKLCallback(script_args.kl_target)] if script_args.kl_target else []
    trainer = ppo.build_ppo_trainer(
        training_args,
        tokenizer,
        policy,
        reward_model,
        value_model,
        train_dataset=dataset["train"].select_columns(["input_ids"]),
        eval_dataset=held_out.select_columns(["input_ids"]),
        peft_config=models.policy_lora,
        callbacks=[*callbacks, *steps.training_callbacks()],
        shared_base=models.shared,
    )
    # Gold (the judge) and proxy (the reward model) at points through training, on a reduced held-out set.
    curve = overoptimization.attach_curve(trainer, evaluation, script_args, lambda: ppo.policy_and_reference(trainer))
    progress.attach_progress(trainer, "ppo", ["objective/scores", "objective/kl"], script_args.verbose)
    ppo.train_ppo(trainer, resume_from_checkpoint=plan.resume_from)
    trainer.save_model(training_args.output_dir)
    ppo.save_value_model(trainer, f"{training_args.output_dir}/value")

    trained, reference, reference_ctx = ppo.policy_and_reference(trainer)
    metrics = {
        **evaluation.compare(trained, reference, reference_ctx),
        **overoptimization.finish_curve(curve, "ppo", training_args.output_dir, trainer.is_world_process_zero()),
        "train_kl_last": steps.last_logged(trainer.state.log_history, "objective/kl"),
        "kl_coef_final": training_args.kl_coef,
        "episodes": trainer.state.episode,
        "params": parameter_counts(models, trained, separate_reference=trainer.ref_model is not None),
        "policy_base": model_args.model_name_or_path,
        "reward_model": training_args.reward_model_path,
        **steps.shared_metrics(trainer, tokenizer),
    }
    steps.finish_run(
        trainer,
        metrics,
        [
            "objective/scores",
            "objective/kl",
            "objective/entropy",
            "val/response_length",
            "objective/rlhf_reward",
            "loss/value_avg",
        ],
        script_args,
        training_args,
        model_args,
    )
    console.say(
        f"ppo: {held_out_summary(metrics)}, win-rate {metrics['win_rate']:.2f}; saved to {training_args.output_dir}"
    )
    return metrics


def make_parser():
    from trl import ModelConfig, TrlParser

    from kochat_trl.rl.ppo import PPOConfig

    return TrlParser((PPOScriptArguments, PPOConfig, ModelConfig))


if __name__ == "__main__":
    from kochat_trl.recipes.steps import run_recipe

    run_recipe(make_parser, main)
