"""Our recipes vs a bare TRL script, stage by stage: speed, peak memory, trainable parameter share.

Per stage (SFT, RM, PPO, generation) both sides get the same model folder, the same train rows (the bare
script receives the rows the recipe builds), the same trainer settings (the shipped tiny YAML + the overrides
below) and the same number of steps; they run alternately (ours, bare, ours, bare, ...) in fresh processes.
Reported: medians of tokens/s (episodes/s for PPO), seconds per optimizer step (first step excluded as
warm-up), the training loop's wall time, the time spent importing and setting up before it, peak memory
during the loop, the trainable share, and ours/bare ratios.

    python benchmarks/bench_stages.py --model tiny                        # embedded default, all stages
    python benchmarks/bench_stages.py --model kogpt2-random --stages sft  # ~125M random GPT-2, kogpt2 dims
    python benchmarks/bench_stages.py --model EleutherAI/polyglot-ko-1.3b --device cuda   # GPU, bf16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import harness
import models

STAGES = ("sft", "rm", "ppo", "generate")
# Per model: enough steps for a stable median on 2 CPU cores, each invocation well under 10 minutes.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {  # the shipped tiny configs' lengths; SFT's 120 steps; PPO 16 updates of 16 rollouts in 2 minibatches
        "sft": {"max_steps": 120, "per_device_train_batch_size": 16, "max_length": 256},
        "rm": {"max_steps": 120, "per_device_train_batch_size": 16, "max_length": 256},
        "ppo": {
            "total_episodes": 256,
            "per_device_train_batch_size": 16,
            "local_rollout_forward_batch_size": 16,
            "response_length": 48,
            "eval_prompts": 16,
            "eval_samples_per_prompt": 1,
        },
        "generate": {"prompts": 64, "batch_size": 8, "max_new_tokens": 64},
    },
    "small": {  # ~100M+ random models on CPU (kogpt2-random)
        "sft": {"max_steps": 6, "per_device_train_batch_size": 4, "max_length": 128},
        "rm": {"max_steps": 6, "per_device_train_batch_size": 4, "max_length": 128},
        "ppo": {
            "total_episodes": 16,
            "per_device_train_batch_size": 4,
            "num_mini_batches": 1,
            "whiten_rewards": False,  # whitening needs minibatches of at least 8 rollouts
            "local_rollout_forward_batch_size": 4,
            "response_length": 32,
            "eval_prompts": 4,
            "eval_samples_per_prompt": 1,
        },
        "generate": {"prompts": 8, "batch_size": 8, "max_new_tokens": 32},
    },
    "gpu": {
        "sft": {"max_steps": 20, "per_device_train_batch_size": 8, "max_length": 512},
        "rm": {"max_steps": 20, "per_device_train_batch_size": 8, "max_length": 512},
        "ppo": {
            "total_episodes": 64,
            "per_device_train_batch_size": 8,
            "num_mini_batches": 1,
            "local_rollout_forward_batch_size": 8,
            "response_length": 64,
            "eval_prompts": 8,
            "eval_samples_per_prompt": 1,
        },
        "generate": {"prompts": 32, "batch_size": 8, "max_new_tokens": 64},
    },
}
# Every run: no eval, no checkpoints, no progress bars (worker.py turns token counting on for both sides).
COMMON = {
    "eval_strategy": "no",
    "save_strategy": "no",
    "disable_tqdm": True,
    "report_to": "none",
    "init_tiny": False,
    "overwrite": True,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny, kogpt2-random, or a fit-check preset (skt/kogpt2-base-v2, "
        "EleutherAI/polyglot-ko-1.3b, -5.8b, -12.8b): random weights, real sizes",
    )
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument(
        "--profile",
        choices=tuple(PROFILES),
        default=None,
        help="step counts and batch sizes (default: tiny for tiny, small on CPU, gpu on CUDA)",
    )
    parser.add_argument("--lora", action="store_true", help="train SFT and RM with LoRA (the tiny configs train fully)")
    parser.add_argument("--steps", type=int, default=None, help="override max_steps (SFT, RM)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the per-device batch size")
    parser.add_argument("--max-length", type=int, default=None, help="override max_length (SFT, RM)")
    parser.add_argument("--episodes", type=int, default=None, help="override PPO total_episodes")
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.stages = harness.choices_list("--stages", args.stages, STAGES)
    args.profile = args.profile or harness.default_profile(args)
    return args


def stage_config(stage: str, args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """The recipe config both sides train with: shipped tiny YAML + benchmark overrides."""
    config = harness.load_stage_config(stage)
    config.update(COMMON)
    config.update(PROFILES[args.profile][stage])
    config["model_name_or_path"] = str(model_dir)
    if stage == "ppo":
        config["reward_model_path"] = str(model_dir)  # a fresh score head on the base: speed ignores weights
    else:
        config["eval_fraction"] = 0.0  # no held-out split, no eval pass: only the training loop is compared
        if args.lora:
            config["use_peft"] = True
    if args.steps and stage != "ppo":
        config["max_steps"] = args.steps
    if args.max_length and stage != "ppo":
        config["max_length"] = args.max_length
    if args.batch_size:
        config["per_device_train_batch_size"] = args.batch_size
        if stage == "ppo":
            config["local_rollout_forward_batch_size"] = args.batch_size
    if args.episodes and stage == "ppo":
        config["total_episodes"] = args.episodes
    if args.device == "cuda":
        config.update({"bf16": True, "dtype": "bfloat16"})
    else:
        config["use_cpu"] = True
    return config


def build_variants(stage: str, args: argparse.Namespace, model_dir: Path, scratch: Path) -> list[harness.Variant]:
    from transformers import AutoConfig

    from kochat_trl.models.lora import lora_target_modules

    base = {"stage": stage, "device": args.device, "threads": args.threads, "model_dir": str(model_dir), "warmup": 1}
    if stage == "generate":
        settings = PROFILES[args.profile]["generate"]
        template = harness.load_stage_config("ppo")["template"]
        from kochat_trl.eval.decoding import load_prompts

        prompts = load_prompts("bundled:ppo")
        raw = [prompts[index % len(prompts)] for index in range(settings["prompts"])]
        texts = models.generation_texts(settings["prompts"], model_dir)
        base.update({"template": template, "prompts": raw, "texts": texts, "generate": settings})
    else:
        config = stage_config(stage, args, model_dir)
        rows_path = scratch / f"{stage}-rows.json"
        rows_path.write_text(json.dumps(models.stage_rows(stage, config, model_dir), ensure_ascii=False))
        base.update(
            {
                "config": config,
                "rows": str(rows_path),
                "lora_targets": lora_target_modules(AutoConfig.from_pretrained(model_dir)),
            }
        )
    return [harness.Variant("ours", {**base, "role": "ours"}), harness.Variant("bare", {**base, "role": "bare"})]


def render(model: str, summaries: dict[str, dict[str, dict[str, Any]]], machine: dict[str, Any]) -> str:
    rows, ratios = [], []
    for stage, pair in summaries.items():
        for label in ("ours", "bare"):
            s = pair[label]
            rows.append(
                [
                    stage,
                    label,
                    f"{harness.fmt(s['throughput'], 1)} {s['throughput_unit']}",
                    s["step_s"],
                    s["loop_s"],
                    s["import_s"],
                    s["setup_s"],
                    s["process_wall_s"],
                    harness.memory_cell(s),
                    harness.share_text(s),
                    s["train_loss"],
                    f"{s['runs_clean']}/{s['runs_total']}",
                    s["load1_before"],
                    f"{100 * (s['foreign_cpu'] or 0):.1f} %",
                ]
            )
        ours, bare = pair["ours"], pair["bare"]
        memory_key = "peak_cuda_bytes" if ours.get("peak_cuda_bytes") is not None else "peak_rss_bytes"
        ratios.append(
            [
                stage,
                harness.ratio(ours["throughput"], bare["throughput"]),
                harness.ratio(ours["step_s"], bare["step_s"]),
                harness.ratio(ours["loop_s"], bare["loop_s"]),
                harness.ratio(ours["loop_cpu_s"], bare["loop_cpu_s"]),
                harness.ratio(ours[memory_key], bare[memory_key]),
                harness.ratio(ours["process_wall_s"], bare["process_wall_s"]),
            ]
        )
    memory = "peak CUDA allocated" if machine["device"] == "cuda" else "peak RSS"
    table = harness.markdown_table(
        [
            "stage",
            "side",
            "throughput",
            "s/step",
            "loop s",
            "import s",
            "setup s",
            "process s",
            memory,
            "trainable",
            "train loss",
            "clean runs",
            "load1",
            "foreign CPU",
        ],
        rows,
    )
    ratio_table = harness.markdown_table(
        [
            "stage",
            "throughput ours/bare",
            "s/step ours/bare",
            "loop ours/bare",
            "loop CPU time ours/bare",
            f"{memory} ours/bare",
            "process ours/bare",
        ],
        ratios,
    )
    return (
        f"### {model}: ours vs bare TRL ({machine['device']}, {machine['torch_threads']} threads)\n\n"
        f"{table}\n\n{ratio_table}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch, machine = harness.start(args, "stages")
    model_dir = models.model_folder(args.model, scratch / "models", args.device)
    print(
        f"[bench] model {args.model} at {model_dir}; machine {machine['cpu']} x{machine['cpu_count']}, "
        f"{args.threads} torch threads",
        flush=True,
    )
    summaries: dict[str, dict[str, dict[str, Any]]] = {}
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for stage in args.stages:
        variants = build_variants(stage, args, model_dir, scratch)
        labels = " / ".join(variant.label for variant in variants)
        print(f"\n[bench] {stage}: {labels} alternating, {args.repeats} each", flush=True)
        harness.run_alternating(variants, args, scratch / stage)
        summaries[stage] = {variant.label: harness.summarize(variant) for variant in variants}
        raw[stage] = {variant.label: variant.runs for variant in variants}
    markdown = render(args.model, summaries, machine)
    print("\n" + markdown)
    name = f"stages-{args.model.split('/')[-1]}-{args.device}"
    if args.stages != list(STAGES):
        name += "-" + "-".join(args.stages)
    payload = {
        "benchmark": "stages",
        "command": harness.command_line(),
        "model": args.model,
        "params": models.model_params(model_dir),
        "profile": PROFILES[args.profile],
        "machine": machine,
        "gate": vars(harness.Gate.from_args(args)),
        "summary": summaries,
        "runs": raw,
    }
    harness.finish(args, scratch, name, payload, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
