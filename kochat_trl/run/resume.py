"""Interrupts and resumption: a signal saves a checkpoint and stops; every stage continues from one.

HF's Trainer resumes SFT and RM itself (`train(resume_from_checkpoint=...)`). TRL 1.12's PPOTrainer
cannot (trl#2657): the pieces it lacks live here and `kochat_trl.rl` wires them into its loop.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from kochat_trl.errors import ConfigError, Stopped

TRAINER_STATE_FILE = "trainer_state.json"  # HF writes it last into a checkpoint: present = checkpoint complete
VALUE_SUBDIR = "value"  # PPO checkpoints keep the value model (adapter or full) here
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Stopped):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; the recipe exits 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint for this step"
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} at step {step}; {where}; "
            "continue with --resume_from_checkpoint last"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint the Trainer finished writing: a kill during the save leaves one without trainer_state.json (the
    last file written) or with half of it."""
    path = Path(path)
    if not (path / TRAINER_STATE_FILE).is_file() or (path / "checkpoint-is-incomplete.txt").exists():
        return False
    # The Trainer writes trainer_state.json in place (not atomically): a kill during that write leaves half of it.
    try:
        return isinstance(json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8")), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete `checkpoint-N` folder in `output_dir`, or None."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = []
    for child in output_dir.iterdir():
        prefix, _, step = child.name.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and child.is_dir():
            steps.append((int(step), child))
    return next((path for _, path in sorted(steps, reverse=True) if is_complete_checkpoint(path)), None)


def resume_requested(training_args: Any) -> bool:
    """Whether resume_from_checkpoint is set (to a path, true or last)."""
    value = training_args.resume_from_checkpoint
    return value not in (None, False) and str(value).lower() not in ("", "false", "none")


def resume_checkpoint(training_args: Any) -> str | None:
    """`resume_from_checkpoint`: a path, or true/last for the newest complete checkpoint in output_dir."""
    if not resume_requested(training_args):
        return None
    value = training_args.resume_from_checkpoint
    if str(value).lower() in ("true", "last"):
        last = last_complete_checkpoint(training_args.output_dir)
        if last is None:
            raise ConfigError(
                f"{training_args.output_dir}: no complete checkpoint-* folder to resume from; "
                "drop --resume_from_checkpoint to start from the beginning"
            )
        return str(last)
    if not Path(value).is_dir():
        raise ConfigError(f"{value}: resume_from_checkpoint is not a checkpoint folder")
    if not is_complete_checkpoint(value):
        raise ConfigError(
            f"{value}: checkpoint is incomplete (its save was cut short: no trainer_state.json); "
            "resume from an earlier checkpoint"
        )
    return str(value)


def train(trainer: Any, checkpoint: str | os.PathLike | None) -> None:
    """`trainer.train(resume_from_checkpoint=checkpoint)`, except from a checkpoint at max_steps (a run killed after
    its last checkpoint, before the stage finished): the Trainer would train one more step when max_steps ends
    mid-epoch (it checks the limit only after a step), so the checkpoint is loaded and nothing trained."""
    if checkpoint is not None and 0 < trainer.args.max_steps <= read_trainer_state(checkpoint)["global_step"]:
        from transformers import TrainerState

        trainer._load_from_checkpoint(str(checkpoint))
        trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_FILE))
        return
    trainer.train(resume_from_checkpoint=checkpoint)


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C during training: stopped in the middle of a step, which is not saved; the recipe exits 130.

    A KeyboardInterrupt, as Python's own would be: it can arrive at any line, and no `except Exception` on the
    way (the libraries have some) may swallow it."""

    def __init__(self, signum: int, output_dir: str | os.PathLike | None) -> None:
        self.signum = signum
        checkpoint = last_complete_checkpoint(output_dir) if output_dir else None
        where = (
            f"continue from {checkpoint} with --resume_from_checkpoint last"
            if checkpoint
            else "no checkpoint was saved; rerun to train the stage from the start"
        )
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} twice: stopped at once, the step in "
            f"progress is lost; {where}"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class InterruptCallback(TrainerCallback):
    """First SIGINT/SIGTERM during training: finish the step, save a checkpoint, raise `TrainingInterrupted`.

    The Trainer (and our PPO loop) saves when `control.should_save` is set at step end; raising from
    `on_save` then stops any loop, including TRL's PPO loop, which ignores `should_training_stop`. A
    second signal stops at once: SIGINT raises `StoppedAtOnce` (where the previous handler was Python's own),
    SIGTERM gets the previous handler (by default the process ends, 143 to a shell). All processes stop at
    the same step: the signal is shared through an all-reduce when several are training.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}
        self._output_dir: str | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        previous = self._previous.get(signum, signal.SIG_DFL)
        # Python's handler would raise a bare KeyboardInterrupt, which reads like an interrupt outside training.
        signal.signal(signum, self._stop_at_once if previous is signal.default_int_handler else previous)

    def _stop_at_once(self, signum: int, frame: Any) -> None:
        self._restore_handlers()  # a third Ctrl-C (during the teardown) gets Python's handler again
        raise StoppedAtOnce(signum, self._output_dir)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._output_dir = args.output_dir
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = {signum: signal.signal(signum, self._handle) for signum in _SIGNALS}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            shared = torch.tensor([self.signum], device=args.device)
            torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MAX)
            self.signum = int(shared.item())
        if self.signum:
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.signum:
            self._restore_handlers()
            raise TrainingInterrupted(
                self.signum, state.global_step, str(checkpoint_dir(args.output_dir, state.global_step))
            )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._restore_handlers()
        if self.signum:  # arrived after the last step (final evaluation): stop without finishing the stage
            checkpoint = last_complete_checkpoint(args.output_dir)
            raise TrainingInterrupted(self.signum, state.global_step, str(checkpoint) if checkpoint else None)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class NoPickleCheckpoints(TrainerCallback):
    """Delete `training_args.bin` from each new checkpoint: a pickle (loading runs code) nothing reads on resume.

    Weights are safetensors; optimizer.pt, scheduler.pt and rng_state.pth stay (resume needs them) and
    are read with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
    """

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.should_save:
            (checkpoint_dir(args.output_dir, state.global_step) / "training_args.bin").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# PPO: what TRL's loop does not save or restore


def save_model_weights(model: Any, folder: str | os.PathLike) -> None:
    """A PEFT adapter or a full model, as safetensors."""
    model.save_pretrained(folder, safe_serialization=True)


def load_model_weights(model: Any, folder: str | os.PathLike) -> None:
    """Load what `save_model_weights` wrote back into `model` (same architecture), strictly."""
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    folder = Path(folder)
    if hasattr(model, "load_adapter_weights"):  # a shared-base value model (kochat_trl.models.shared_base)
        model.load_adapter_weights(folder)
        return
    if isinstance(model, PeftModel):
        result = set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"))
        unexpected, missing = list(result.unexpected_keys), []
    else:
        from transformers.trainer_utils import load_sharded_checkpoint

        if (folder / "model.safetensors").is_file():
            from safetensors.torch import load_file

            result = model.load_state_dict(load_file(folder / "model.safetensors", device="cpu"), strict=False)
        else:
            result = load_sharded_checkpoint(model, str(folder), strict=False, prefer_safe=True)
        unexpected = list(result.unexpected_keys)
        missing = [key for key in result.missing_keys if key not in _tied_parameter_names(model)]
    if unexpected or missing:
        raise RuntimeError(
            f"{folder}: checkpoint does not match the model (unexpected {unexpected[:3]}, missing {missing[:3]})"
        )


def _tied_parameter_names(model: Any) -> set[str]:
    # save_pretrained stores a tied weight (lm_head = embeddings) once; the other name is missing on load.
    by_storage: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_storage.setdefault(tensor.data_ptr(), []).append(name)
    return {name for names in by_storage.values() if len(names) > 1 for name in names}


def load_optimizer_and_scheduler(optimizer: Any, scheduler: Any, checkpoint: str | os.PathLike) -> None:
    checkpoint = Path(checkpoint)
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", map_location="cpu", weights_only=True))


def read_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text(encoding="utf-8"))


class ContinueFromCheckpoint(TrainerCallback):
    """Put a checkpoint's counters and log back after TRL's PPO loop reset them to zero (its `on_train_begin`
    is the only moment between that reset and the first update). Must run before the other callbacks."""

    def __init__(self, saved: dict[str, Any], max_steps: int) -> None:
        self.saved, self.max_steps = saved, max_steps

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        state.global_step = self.saved["global_step"]
        state.episode = self.saved.get("episode", 0)
        state.log_history = list(self.saved["log_history"])
        state.stateful_callbacks.update(self.saved.get("stateful_callbacks") or {})  # e.g. the gold-proxy curve
        state.max_steps = self.max_steps


class EpochSeededBatches:
    """The batches TRL's PPO loop cycles through, in an order a resumed run can reproduce.

    Epoch e is shuffled by a generator seeded with `seed + e` (TRL shuffles with the global RNG, so
    an epoch's order is lost when the process dies); the first `skip` batches of the run are left
    out; `before_first` (restoring the RNG states) runs at the point where the uninterrupted run
    had exactly those states: before a new epoch's iterator is made, or after skipping into one.
    """

    def __init__(self, dataloader: Any, seed: int, skip: int = 0, before_first: Callable[[], None] | None = None):
        self.dataloader, self.seed = dataloader, seed
        # Single process: DataLoader -> BatchSampler -> RandomSampler; several: accelerate's BatchSamplerShard
        # wraps that BatchSampler (every rank draws the same permutation and takes its share of batches).
        batches = dataloader.batch_sampler
        holders = (batches, getattr(batches, "batch_sampler", None))
        self.sampler = next(
            (holder.sampler for holder in holders if hasattr(getattr(holder, "sampler", None), "generator")), None
        )
        if self.sampler is None or not len(dataloader):
            raise TypeError("PPO needs a shuffled DataLoader with at least one batch")
        if self.sampler.generator is None:
            self.sampler.generator = torch.Generator()
        self.epoch, self.offset = divmod(skip, len(dataloader))
        self.before_first = before_first

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self) -> Iterator[Any]:
        self.sampler.generator.manual_seed(self.seed + self.epoch)
        skip, self.offset = self.offset, 0
        restore, self.before_first = self.before_first, None
        if restore and not skip:
            restore()
            restore = None
        for index, batch in enumerate(self.dataloader):
            if index < skip:
                continue
            if restore:
                restore()
                restore = None
            yield batch
        self.epoch += 1
