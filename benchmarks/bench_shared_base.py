"""Shared-base PPO vs separate models: the same PPO run (same seeds, a few updates), alternated in fresh processes.

Separate: the policy (SFT + LoRA; the reference is it with the adapter off), the reward model (SFT + reward
adapter, merged: a second copy of the base) and the value model (SFT + the reward adapter trained on: a third).
Shared (`shared_base: true`): one base, with the policy, reward and value adapters and two score heads.

    python benchmarks/bench_shared_base.py --model kogpt2-random     # ~125M random GPT-2 with kogpt2's dimensions
    python benchmarks/bench_shared_base.py --model tiny --repeats 3

Printed and written (results/shared-base-<model>-<device>.json):
- model_bytes {separate, shared}: the unique parameter and buffer storage of the four roles together, counted
  from the live tensors once training is set up (tensors that share storage count once);
- peak_rss_mb {separate, shared}: the worker process's peak RSS (loading, runtime, activations and all);
- seconds_per_update {separate, shared}: median wall time between PPO updates (the first is warm-up);
- max_abs_diff: of the per-update logged scores, KL and losses between the two (same maths: ~1e-6 or a bug).

The reward adapter is a seeded random LoRA + score head on the model (speed and memory do not depend on what
it learned), saved the way stage 2 saves one.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness
import models
import worker as worker_module

MODES = ("separate", "shared")
COMPARED = ("objective/scores", "objective/kl", "objective/rlhf_reward", "loss/policy_avg", "loss/value_avg")
# Per model: a few updates, each worker well under the harness timeout on 2 CPU cores.
PROFILES = {
    "tiny": {
        "total_episodes": 128,
        "per_device_train_batch_size": 16,
        "local_rollout_forward_batch_size": 16,
        "response_length": 32,
        "eval_prompts": 8,
    },
    "small": {
        "total_episodes": 20,
        "per_device_train_batch_size": 4,
        "num_mini_batches": 1,
        "whiten_rewards": False,  # whitening needs minibatches of at least 8 rollouts
        "local_rollout_forward_batch_size": 4,
        "response_length": 24,
        "eval_prompts": 4,
    },
    "gpu": {
        "total_episodes": 64,
        "per_device_train_batch_size": 8,
        "num_mini_batches": 1,
        "local_rollout_forward_batch_size": 8,
        "response_length": 64,
        "eval_prompts": 8,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="kogpt2-random", help="tiny, kogpt2-random, or a fit-check preset")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None, help="default: by model and device")
    harness.add_common_arguments(parser, repeats=2)
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "SETUP_JSON", "RESULT_JSON"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def reward_adapter(model_dir: Path, folder: Path) -> Path:
    """A SEQ_CLS LoRA adapter with a score head on `model_dir`, seeded random weights (what stage 2 saves)."""
    if (folder / "adapter_config.json").is_file():
        return folder
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification
    from trl import ModelConfig

    from kochat_trl.models.loading import load_tokenizer
    from kochat_trl.models.lora import build_peft_config

    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=str(model_dir)), announce=False)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    lora = build_peft_config(ModelConfig(use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.0), model, "SEQ_CLS")
    torch.manual_seed(1)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)  # a trained adapter is not zero
    peft_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def ppo_config(args: argparse.Namespace, model_dir: Path, rm_dir: Path) -> dict[str, Any]:
    config = harness.load_stage_config("ppo")
    config.update(PROFILES[args.profile])
    config.update(
        {
            "model_name_or_path": str(model_dir),
            "reward_model_path": str(rm_dir),
            "eval_samples_per_prompt": 1,
            "eval_fraction": 0.05,
            "seed": 42,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
        }
    )
    if "lm_head" in (config.get("lora_modules_to_save") or []) and args.model != "tiny":
        config["lora_modules_to_save"] = None  # a 51,200-wide lm_head copy would dwarf the adapters
    if args.device == "cuda":
        config.update({"bf16": True, "dtype": "bfloat16"})
    else:
        config["use_cpu"] = True
    return config


def unique_bytes(modules: list[Any]) -> int:
    """Bytes of the distinct storages behind the parameters and buffers of `modules` (shared ones once)."""
    seen: dict[int, int] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def worker(mode: str, setup_path: Path, result_path: Path) -> None:
    """One PPO run in this fresh process; writes its figures to `result_path`."""
    setup = json.loads(setup_path.read_text())
    import torch
    from transformers import TrainerCallback

    from kochat_trl.config.parsing import parse_recipe_args
    from kochat_trl.rl import ppo as rl_ppo

    torch.set_num_threads(setup["threads"])
    recipe = worker_module.load_recipe("ppo")
    figures: dict[str, Any] = {"mode": mode, "update_times": []}
    original_train = rl_ppo.train_ppo

    class Times(TrainerCallback):
        def on_step_end(self, args, state, control, **_):
            figures["update_times"].append(time.perf_counter())

    def measured_train(trainer, **kwargs):
        roles = [trainer.model, trainer.reward_model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
        if trainer.shared_base is not None:
            roles.append(trainer.shared_base.reward)
        figures["model_bytes"] = unique_bytes(roles)
        trainer.add_callback(Times())
        figures["loop_start"] = time.perf_counter()
        original_train(trainer, **kwargs)

    rl_ppo.train_ppo = measured_train
    config = {**setup["config"], "shared_base": mode == "shared", "output_dir": setup["output_dir"] + "-" + mode}
    config_path = Path(config["output_dir"] + ".yaml")
    import yaml

    config_path.write_text(yaml.safe_dump(config, allow_unicode=True))
    metrics = recipe.main(
        *parse_recipe_args(recipe.make_parser(), ["--config", str(config_path), "--overwrite", "true"])
    )
    history = json.loads((Path(config["output_dir"]) / "log_history.json").read_text())
    times = [figures["loop_start"], *figures["update_times"]]
    intervals = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    figures.update(
        {
            "seconds_per_update": statistics.median(intervals[1:] or intervals),
            "updates": len(intervals),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            "logged": [{key: entry[key] for key in COMPARED if key in entry} for entry in history],
            "params": metrics["params"],
            "reward_before": metrics["reward_before"],
            "reward_after": metrics["reward_after"],
        }
    )
    del figures["update_times"], figures["loop_start"]
    result_path.write_text(json.dumps(figures))


def run_mode(mode: str, setup: Path, scratch: Path, args: argparse.Namespace, repeat: int) -> dict[str, Any]:
    result = scratch / f"{mode}-{repeat}.json"
    command = [sys.executable, __file__, "--worker", mode, str(setup), str(result)]
    started = time.perf_counter()
    process = subprocess.run(
        command,
        env=harness.worker_env(args.threads),
        cwd=harness.REPO,
        capture_output=True,
        text=True,
        timeout=args.timeout,
    )
    if process.returncode != 0 or not result.is_file():
        raise harness.BenchmarkError(f"{mode} run {repeat} failed:\n{(process.stdout + process.stderr)[-3000:]}")
    figures = json.loads(result.read_text())
    figures["process_wall_s"] = time.perf_counter() - started
    print(
        f"[bench] {mode:<9} run {repeat}  {figures['seconds_per_update']:6.2f} s/update  "
        f"model {figures['model_bytes'] / 2**20:8.1f} MB  peak RSS {figures['peak_rss_mb']:8.0f} MB  "
        f"reward {figures['reward_before']:.3f} -> {figures['reward_after']:.3f}",
        flush=True,
    )
    return figures


def max_abs_diff(first: list[dict[str, float]], second: list[dict[str, float]]) -> dict[str, float]:
    return {key: max(abs(a[key] - b[key]) for a, b in zip(first, second, strict=True)) for key in COMPARED}


def render(model: str, summary: dict[str, Any]) -> str:
    rows = [
        [label, summary[key]["separate"], summary[key]["shared"], summary["ratio"][key]]
        for label, key in (
            ("model storage (MB)", "model_mb"),
            ("peak RSS (MB)", "peak_rss_mb"),
            ("seconds per update", "seconds_per_update"),
        )
    ]
    table = harness.markdown_table(["", "separate", "shared", "shared / separate"], rows)
    diffs = ", ".join(f"{key} {value:.1e}" for key, value in summary["max_abs_diff"].items())
    return f"## Shared-base PPO, {model}\n\n{table}\n\nmax |separate - shared| per update: {diffs}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        mode, setup, result = args.worker
        worker(mode, Path(setup), Path(result))
        return 0
    args.profile = args.profile or harness.default_profile(args)
    name = f"shared-base-{args.model.split('/')[-1]}-{args.device}"
    scratch, machine = harness.start(args, name)
    model_dir = models.model_folder(args.model, scratch, args.device)
    rm_dir = reward_adapter(model_dir, scratch / "reward-adapter")
    setup = scratch / "setup.json"
    setup.write_text(
        json.dumps(
            {"config": ppo_config(args, model_dir, rm_dir), "threads": args.threads, "output_dir": str(scratch / "ppo")}
        )
    )
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES:  # alternated: drift of the machine hits both alike
            runs[mode].append(run_mode(mode, setup, scratch, args, repeat))

    def median(key: str) -> dict[str, float]:
        return {mode: statistics.median(run[key] for run in runs[mode]) for mode in MODES}

    model_bytes = {mode: runs[mode][0]["model_bytes"] for mode in MODES}  # exact, the same in every repeat
    summary = {
        "model": args.model,
        "profile": args.profile,
        "machine": machine,
        "config": json.loads(setup.read_text())["config"],
        "model_bytes": model_bytes,
        "model_mb": {mode: value / 2**20 for mode, value in model_bytes.items()},
        "peak_rss_mb": median("peak_rss_mb"),
        "seconds_per_update": median("seconds_per_update"),
        "max_abs_diff": max_abs_diff(runs["separate"][0]["logged"], runs["shared"][0]["logged"]),
        "runs": runs,
    }
    if args.device == "cuda":
        summary["peak_cuda_mb"] = median("peak_cuda_mb")
    summary["ratio"] = {
        key: summary[key]["shared"] / summary[key]["separate"]
        for key in ("model_mb", "peak_rss_mb", "seconds_per_update")
    }
    markdown = render(args.model, summary)
    print("\n" + markdown)
    harness.finish(args, scratch, name, summary, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
