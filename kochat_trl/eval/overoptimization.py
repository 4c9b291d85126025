"""Gold against proxy over training (Gao et al. 2022): the judge's good rate and the reward model's score at
evaluation points through an RL run, against the KL to the SFT policy.

The reward model is a proxy for what the judge checks. While both rise, training helps; where the gold peaks
and falls while the proxy still rises, the policy has started buying reward the judge does not grant: reward
hacking, named with the step it began at. Each point samples a reduced held-out set (`curve_prompts` x
`curve_samples_per_prompt` answers) without touching the training RNG.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from kochat_trl.eval.held_out import HeldOutEvaluation
from kochat_trl.eval.reporting import save_figure

CURVE_FILE = "overoptimization.png"
ModelsNow = Callable[[], tuple[Any, Any, Callable[[], Any]]]  # () -> (policy, reference, reference context)
# How far the gold must fall from its peak, with the proxy higher than at the peak, to be called reward hacking:
# about two standard errors of a good rate on the curve's 120 answers.
HACKING_DROP = 0.08


def curve_steps(max_steps: int, points: int) -> list[int]:
    """`points` evaluation steps from 0 (before training) to `max_steps`, evenly spaced, no step twice."""
    if points < 2 or max_steps < 1:
        return [0] if points >= 1 else []
    return sorted({round(max_steps * index / (points - 1)) for index in range(points)})


class GoldProxyCurve(TrainerCallback, ExportableState):
    """Measures `evaluation` (a reduced held-out set) at `curve_steps`: KL, reward and the judge's rates.

    `models()` returns (the policy being trained, the reference model, the context factory in which the
    reference computes the SFT policy). Runs on every process (under ZeRO-3 sampling gathers the weights).
    """

    def __init__(self, evaluation: HeldOutEvaluation, points: int, models: ModelsNow) -> None:
        self.evaluation, self.points, self.models = evaluation, points, models
        self.curve: list[dict[str, Any]] = []
        self.seconds = 0.0
        self._steps: set[int] = set()

    def _measure(self, step: int) -> None:
        if any(point["step"] == step for point in self.curve):
            return
        started = time.perf_counter()
        self.curve.append({"step": step, **self.evaluation.measure(*self.models())})
        self.seconds += time.perf_counter() - started

    def state(self) -> dict[str, Any]:
        """Saved in each checkpoint's trainer_state.json: a resumed run continues the curve, not starts it again."""
        return {"args": {}, "attributes": {"curve": self.curve, "seconds": self.seconds}}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._steps = set(curve_steps(state.max_steps, self.points))
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step and isinstance(saved, dict):  # resumed: the earlier run's points, up to its checkpoint
            self.curve = [point for point in saved["attributes"]["curve"] if point["step"] <= state.global_step]
            self.seconds = saved["attributes"]["seconds"]
        # TRL's PPO trainer built its state before this callback was added: the checkpoint save expects an entry.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        if state.global_step in self._steps:  # 0, unless resumed: then measured already, unless saved before 0.1
            self._measure(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step in self._steps:
            self._measure(state.global_step)


def reward_hacking_step(curve: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Where the gold (good_rate) peaked before the end while the proxy (reward) still rose after it: the peak's
    step and both values there and at the end; None when the gold held up."""
    if len(curve) < 3:
        return None
    peak = max(range(len(curve)), key=lambda index: curve[index]["good_rate"])
    last = curve[-1]
    if peak == len(curve) - 1 or curve[peak]["good_rate"] - last["good_rate"] < HACKING_DROP:
        return None
    if last["reward"] <= curve[peak]["reward"]:
        return None
    return {
        "step": curve[peak]["step"],
        "good_rate_peak": curve[peak]["good_rate"],
        "good_rate_end": last["good_rate"],
        "reward_peak": curve[peak]["reward"],
        "reward_end": last["reward"],
    }


def hacking_summary(stage: str, hacking: dict[str, Any] | None) -> str | None:
    """The console's and report's line for a run whose gold fell while its proxy rose (None when it did not)."""
    if hacking is None:
        return None
    return (
        f"{stage}: reward hacking after step {hacking['step']}: the judge's good rate fell "
        f"{hacking['good_rate_peak']:.2f} -> {hacking['good_rate_end']:.2f} while the reward model's score rose "
        f"{hacking['reward_peak']:.3f} -> {hacking['reward_end']:.3f}"
    )


def curve_metrics(curve: GoldProxyCurve) -> dict[str, Any]:
    """metrics.json's `curve`, `reward_hacking` and the cost of measuring them."""
    return {
        "curve": curve.curve,
        "curve_answers": len(curve.evaluation.prompts),
        "curve_seconds": round(curve.seconds, 2),
        "reward_hacking": reward_hacking_step(curve.curve),
    }


def plot_overoptimization(curve: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Gold (the judge's good and polite rates) and proxy (the reward model's mean score) against √KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curve:
        return None
    root_kl = [math.sqrt(max(point["kl"], 0.0)) for point in curve]
    figure, gold = plt.subplots(figsize=(6.4, 4.0))
    gold.plot(root_kl, [point["good_rate"] for point in curve], "o-", color="tab:green", label="good (gold, judge)")
    gold.plot(root_kl, [point["polite_rate"] for point in curve], "s:", color="tab:olive", label="polite (judge)")
    gold.set_xlabel("√KL to the SFT policy (nats)")
    gold.set_ylabel("judge's rate (seen topics)")
    gold.set_ylim(0, 1.02)
    gold.grid(alpha=0.3)
    proxy = gold.twinx()
    proxy.plot(root_kl, [point["reward"] for point in curve], "^--", color="tab:blue", label="reward (proxy, RM)")
    proxy.set_ylabel("reward model's mean score")
    for x, point in zip(root_kl, curve, strict=True):
        gold.annotate(
            str(point["step"]), (x, point["good_rate"]), textcoords="offset points", xytext=(3, 5), fontsize=7
        )
    hacking = reward_hacking_step(curve)
    if hacking is not None:
        index = next(i for i, point in enumerate(curve) if point["step"] == hacking["step"])
        gold.axvline(root_kl[index], color="tab:red", alpha=0.5, linestyle="--")
        gold.text(root_kl[index], 0.03, f" gold peaks at step {hacking['step']}", color="tab:red", fontsize=8)
    handles = [*gold.get_legend_handles_labels()[0], *proxy.get_legend_handles_labels()[0]]
    gold.legend(handles, [handle.get_label() for handle in handles], loc="lower right", fontsize=8)
    gold.set_title(title or "gold against proxy over training (step labels)")
    return save_figure(figure, path)


def attach_curve(
    trainer: Any, evaluation: HeldOutEvaluation, script_args: Any, models: ModelsNow
) -> GoldProxyCurve | None:
    """A `GoldProxyCurve` on the first `curve_prompts` held-out prompts, added to the trainer's callbacks (None when
    `curve_points` is 0)."""
    if script_args.curve_points <= 0:
        return None
    reduced = evaluation.reduced(script_args.curve_prompts, script_args.curve_samples_per_prompt)
    curve = GoldProxyCurve(reduced, script_args.curve_points, models)
    trainer.add_callback(curve)
    return curve


def finish_curve(curve: GoldProxyCurve | None, stage: str, output_dir: str | Path, is_main: bool) -> dict[str, Any]:
    """metrics.json's curve keys; on the main process overoptimization.png and, where the gold fell while the proxy
    rose, one console line naming the step."""
    if curve is None:
        return {}
    from kochat_trl.run.console import say

    metrics = curve_metrics(curve)
    if is_main:
        plot_overoptimization(curve.curve, Path(output_dir) / CURVE_FILE, f"{stage}: gold against proxy")
        line = hacking_summary(stage, metrics["reward_hacking"])
        if line:
            say(line)
    return metrics
