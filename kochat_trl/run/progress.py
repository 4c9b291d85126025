"""Training progress on the console and in the stage folder: one bar per stage, every log entry in train.log.

The Trainer's own console callbacks print a dict per logged step under a tqdm bar; a stage gets one bar with
step/total, ETA and its key numbers instead (plain lines at each third when the output is not a terminal),
and the full per-step metrics go to `OUTPUT_DIR/train.log`, one JSON object per line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from transformers import TrainerCallback

from kochat_trl.run.console import interactive, say

TRAIN_LOG = "train.log"


class TrainLog(TrainerCallback):
    """Every log entry (per-step metrics, evaluations) appended to `OUTPUT_DIR/train.log` as one JSON object."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / TRAIN_LOG

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as log:
                log.write(json.dumps({"step": state.global_step, **logs}, ensure_ascii=False, default=str) + "\n")


class StageProgress(TrainerCallback):
    """One progress bar per stage: step/total, ETA and the stage's key numbers (`keys` of the logs). Without a
    terminal the bar becomes a plain line at each third of the run."""

    def __init__(self, stage: str, keys: Sequence[str], stream: TextIO | None = None) -> None:
        self.stage, self.keys = stage, tuple(keys)
        self.stream = stream or sys.stdout
        self.bar: Any = None
        self.latest: dict[str, float] = {}
        self.reported = 0
        self.started = 0.0

    def numbers(self) -> str:
        return ", ".join(f"{key} {self.latest[key]:.3f}" for key in self.keys if key in self.latest)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()
        self.reported = state.global_step * 3 // max(state.max_steps, 1)
        if state.is_world_process_zero and interactive(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc=self.stage,
                file=self.stream,
                dynamic_ncols=True,
                leave=False,
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            return
        third = state.global_step * 3 // max(state.max_steps, 1)
        if self.reported < third < 3:  # the last third is the stage's result line
            self.reported = third
            numbers = self.numbers()
            say(
                f"{self.stage}: step {state.global_step}/{state.max_steps}"
                + (f", {numbers}" if numbers else "")
                + f" ({time.perf_counter() - self.started:.0f} s)",
                self.stream,
            )

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        for key in self.keys:
            if logs and key in logs and _is_number(logs[key]):
                self.latest[key] = float(logs[key])
        if self.bar is not None and self.latest:
            self.bar.set_postfix_str(self.numbers(), refresh=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def attach_progress(trainer: Any, stage: str, keys: Sequence[str], verbose: bool = False) -> None:
    """Every trainer: its log entries go to train.log. Not verbose: the Trainer's console callbacks (a tqdm bar
    printing a dict per log, or the dict printer) give way to one `StageProgress` bar."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.add_callback(TrainLog(trainer.args.output_dir))
    if not verbose:
        for callback in (ProgressCallback, PrinterCallback):
            trainer.remove_callback(callback)
        trainer.add_callback(StageProgress(stage, keys))
