"""Stage 2 of RLHF: a reward model that scores Korean answers, trained on ranked preference pairs.

KoChatGPT-style rankings (completion_0..N-1 + ranking) expand to every ordered pair; the model is a
sequence classifier with one score (LoRA and 8-bit/4-bit from the model config). Metrics: pairwise
accuracy and mean margin on held-out pairs.

    kochat-trl rm --config tiny/reward.yaml
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m kochat_trl.recipes.reward \
        --config polyglot-ko-1.3b/reward.yaml
"""

from __future__ import annotations


def main(script_args, training_args, model_args):
    from accelerate import PartialState
    from trl import RewardTrainer

    from kochat_trl.data.stages import reward_dataset
    from kochat_trl.eval.rewards import pairwise_accuracy
    from kochat_trl.models import loading, lora
    from kochat_trl.recipes import steps
    from kochat_trl.run import console, progress, resume

    plan = steps.prepare_run(script_args, training_args, model_args, stage="rm")
    tokenizer = loading.load_tokenizer(model_args, template=script_args.template)
    with PartialState().main_process_first():
        dataset = reward_dataset(
            script_args.dataset_name, script_args.eval_fraction, training_args.seed, script_args.max_samples
        )
    model = loading.load_reward_model(model_args, tokenizer, 1, training_args.gradient_checkpointing)

    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset.get("eval"),
        processing_class=tokenizer,
        peft_config=lora.build_peft_config(model_args, model, "SEQ_CLS"),
        callbacks=steps.training_callbacks(),
    )
    progress.attach_progress(trainer, "rm", ["loss", "eval_accuracy"], script_args.verbose)
    resume.train(trainer, plan.resume_from)
    trainer.save_model(training_args.output_dir)

    # Scored the way PPO will score: formatted prompt + answer + eos, on every held-out pair.
    held_out = pairwise_accuracy(trainer.model, tokenizer, dataset["eval"]) if "eval" in dataset else {}
    metrics = {
        "accuracy": held_out.get("accuracy"),
        "mean_margin": held_out.get("mean_margin"),
        "eval_pairs": held_out.get("pairs", 0),
        "train_pairs": len(dataset["train"]),
        "train_loss": steps.train_loss(trainer.state.log_history),
        **steps.parameter_metrics(trainer.model, model_args),
        **steps.shared_metrics(trainer, tokenizer),
    }
    steps.finish_run(
        trainer, metrics, ["loss", "eval_loss", "eval_accuracy", "eval_margin"], script_args, training_args, model_args
    )
    console.say(
        f"rm: held-out accuracy {console.number(metrics['accuracy'])}, mean margin "
        f"{console.number(metrics['mean_margin'])} after {metrics['global_step']} steps; "
        f"saved to {training_args.output_dir}"
    )
    return metrics


def make_parser():
    from trl import ModelConfig, RewardConfig, TrlParser

    from kochat_trl.config.arguments import KochatArguments

    return TrlParser((KochatArguments, RewardConfig, ModelConfig))


if __name__ == "__main__":
    from kochat_trl.recipes.steps import run_recipe

    run_recipe(make_parser, main)
