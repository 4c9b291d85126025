"""Runs a recipe unchanged under `accelerate launch` and, on every rank, records what really ran.

    python tests/engine_recorder.py RECIPE RECORD_DIR [recipe arguments...]

After training (Trainer.train for SFT/RM/DPO/RLOO/GRPO, the PPO seam's train for PPO) each rank writes
RECORD_DIR/rank{R}.json: the engine facts read from inside the process (`kochat_trl.run.engines.describe`: the
accelerator's distributed type, the ZeRO stage, this rank's share of the parameters and of the optimizer
state), the wrapper type, the world size, the trainable parameter count, the metrics main() returned, and after
every update the norms of the trained parameters (`norms`: PPO's policy and value model apart, ZeRO-3's shards
gathered).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

recipe, record_dir = sys.argv[1], Path(sys.argv[2])
sys.argv = [recipe, *sys.argv[3:]]
# recipes/NAME.py names the packaged recipe kochat_trl.recipes.NAME (its __main__ block does not run on import).
recipe_module = importlib.import_module(f"kochat_trl.recipes.{Path(recipe).stem}")

from transformers import Trainer, TrainerCallback, set_seed  # noqa: E402

from kochat_trl.recipes.steps import run_recipe  # noqa: E402
from kochat_trl.rl import ppo as rl_ppo  # noqa: E402
from kochat_trl.run import engines  # noqa: E402

seen: dict = {}


class ParameterNorms(TrainerCallback):
    """After every update: the L2 norm of the trained parameters, in float64 (every rank calls it: ZeRO-3 gathers)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        squares: dict[str, float] = {}
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        with engines.gathered(model):
            for name, parameter in trained:
                part = "value" if name.startswith("value_model.") else "policy"  # PPO's PolicyAndValueWrapper
                squares[part] = squares.get(part, 0.0) + float(parameter.detach().double().square().sum())
        seen.setdefault("norms", []).append({"step": state.global_step, **{k: v**0.5 for k, v in squares.items()}})


def recording(train):
    def train_and_record(self, *args, **kwargs):
        self.add_callback(ParameterNorms())
        result = train(self, *args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        seen.update(engines.describe(self.accelerator, model, self.optimizer))
        seen["wrapped_in"] = type(getattr(self, "model_wrapped", None) or self.model).__name__
        seen["world_size"] = self.accelerator.num_processes
        seen["trainable"] = sum(
            p.ds_numel if engines.is_partitioned(p) else p.numel() for p in model.parameters() if p.requires_grad
        )
        return result

    return train_and_record


Trainer.train = recording(Trainer.train)
rl_ppo._LoggingPPOTrainer.train = recording(rl_ppo._LoggingPPOTrainer.train)


def main(script_args, training_args, model_args):
    # The reward model's new score head is drawn from the global RNG before the Trainer seeds it.
    set_seed(training_args.seed)
    metrics = recipe_module.main(script_args, training_args, model_args)
    record_dir.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    (record_dir / f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, **seen}, default=str))
    return metrics


run_recipe(recipe_module.make_parser, main)
