"""Stage 1 of RLHF: supervised fine-tuning (SFT) of a Korean causal LM on questions and conversations.

Loss is on every answer of a conversation (questions and markers are labelled -100) and every answer ends with
eos, so the model learns where to stop. LoRA and 8-bit/4-bit loading come from the model config.

    kochat-trl sft --config tiny/sft.yaml
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m kochat_trl.recipes.sft \
        --config polyglot-ko-1.3b/sft.yaml
"""

from __future__ import annotations


def main(script_args, training_args, model_args):
    from accelerate import PartialState
    from trl import SFTTrainer

    from kochat_trl.data.stages import sft_dataset
    from kochat_trl.models import loading, lora
    from kochat_trl.recipes import steps
    from kochat_trl.run import console, progress, resume

    plan = steps.prepare_run(script_args, training_args, model_args, stage="sft")
    tokenizer = loading.load_tokenizer(model_args, template=script_args.template)
    with PartialState().main_process_first():
        dataset = sft_dataset(
            script_args.dataset_name, tokenizer, script_args.eval_fraction, training_args.seed, script_args.max_samples
        )
    # The rows come tokenized with their answers' mask, which TRL applies only with completion_only_loss: unset, it
    # would guess "not prompt-completion data" and train on the questions too.
    if training_args.completion_only_loss is None:
        training_args.completion_only_loss = True
    model = loading.load_causal_lm(model_args, tokenizer, training_args.gradient_checkpointing)

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset.get("eval"),
        processing_class=tokenizer,
        peft_config=lora.build_peft_config(model_args, model, "CAUSAL_LM"),
        callbacks=steps.training_callbacks(),
    )
    progress.attach_progress(trainer, "sft", ["loss", "eval_loss"], script_args.verbose)
    checkpoint = plan.resume_from
    # The step-0 eval loss is the baseline the fall is measured against. It runs inside train():
    # a trainer.evaluate() before train() prepares the model for evaluation only, and train() then
    # skips the DDP wrapper, so ranks would silently never average their gradients.
    trainer.args.eval_on_start = checkpoint is None and trainer.eval_dataset is not None
    resume.train(trainer, checkpoint)
    end = trainer.evaluate() if trainer.eval_dataset is not None else {}
    trainer.save_model(training_args.output_dir)

    # A resumed run gets the step-0 entry back with the checkpoint's log history.
    start = next((entry for entry in trainer.state.log_history if entry.get("step") == 0 and "eval_loss" in entry), {})
    metrics = {
        "eval_loss_start": start.get("eval_loss"),
        "eval_loss_end": end.get("eval_loss"),
        "train_loss": steps.train_loss(trainer.state.log_history),
        "train_rows": len(dataset["train"]),
        "eval_rows": len(dataset["eval"]) if "eval" in dataset else 0,
        **steps.parameter_metrics(trainer.model, model_args),
        **steps.shared_metrics(trainer, tokenizer),
    }
    steps.finish_run(
        trainer, metrics, ["loss", "eval_loss", "learning_rate", "grad_norm"], script_args, training_args, model_args
    )
    console.say(
        f"sft: eval loss {console.number(metrics['eval_loss_start'])} -> "
        f"{console.number(metrics['eval_loss_end'])} after {metrics['global_step']} steps; "
        f"saved to {training_args.output_dir}"
    )
    return metrics


def make_parser():
    from trl import ModelConfig, SFTConfig, TrlParser

    from kochat_trl.config.arguments import KochatArguments

    return TrlParser((KochatArguments, SFTConfig, ModelConfig))


if __name__ == "__main__":
    from kochat_trl.recipes.steps import run_recipe

    run_recipe(make_parser, main)
