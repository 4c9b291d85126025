"""TRL 1.12's PPOTrainer (trl.experimental), resumable and multi-process safe, and the calls that build, train, save it.

TRL removed PPOTrainer in 1.13; replacing it changes this module and nothing else.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from transformers import TrainerCallback

from kochat_trl.models.shared_base import SharedBase, SharedBaseReference
from kochat_trl.run import engines, resume
from kochat_trl.run.console import known_prints_dropped, known_warnings_ignored

with known_warnings_ignored():  # TRL's one-time "you are importing from trl.experimental" (console.KNOWN_WARNINGS)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as _ppo_module


class _LoggingPPOTrainer(SharedBaseReference, engines.DeepSpeedPPOFixes, PPOTrainer):
    """TRL's PPOTrainer plus the mean response length per update in its logs (TRL does not log it), and
    checkpoints it can resume from (TRL's cannot, trl#2657): the value model is saved with the policy,
    and `train(resume_from_checkpoint)` restores weights, optimizer, scheduler, counters, log, RNG and
    the data position (see `kochat_trl.run.resume`). Under DeepSpeed, `engines.DeepSpeedPPOFixes`; with one shared
    base, its reference context (`kochat_trl.models.shared_base`)."""

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
    reward and value models are its adapters (`kochat_trl.models.shared_base.build`) and `peft_config` is None."""
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


def policy_and_reference(trainer: PPOTrainer) -> tuple[Any, Any, Any]:
    """The policy being trained, the model that computes the reference, and the context it computes it in (the
    policy with its adapter disabled when LoRA, else TRL's reference copy)."""
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    reference = policy if trainer.ref_model is None else trainer.ref_model
    return policy, reference, lambda: reference_context(trainer)


def reference_context(trainer: PPOTrainer) -> AbstractContextManager[Any]:
    """Context in which `trainer.model.policy` computes the reference (adapter disabled), when LoRA."""
    return trainer.null_ref_context() if trainer.ref_model is None else nullcontext()
