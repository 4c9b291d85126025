"""GPU table: the four Korean target architectures x (bf16, 8-bit, 4-bit) + LoRA x every stage, and fit-check.

Each model is built from its real config (`kochat_trl.fitcheck.presets.resolve_model_config`) with random bf16 weights
on the GPU, saved once to the scratch folder, and trained by the real recipes (`kochat_trl/recipes/sft.py`, `reward.py`,
`ppo.py`) on rows of exactly `--seq-len` tokens, so the measured `torch.cuda.max_memory_allocated` (peak over the
training loop) is comparable with `kochat_trl.fitcheck.estimate.estimate(...).tensor_bytes` for the same settings; the
table prints the estimate's error. Generation runs `kochat_trl.eval.generation.Generator` (greedy, bf16 weights).
A run that does not fit is reported as OOM next to the estimate (the estimate should say it does not fit too).

    python benchmarks/bench_gpu.py --device cuda                                   # the whole matrix
    python benchmarks/bench_gpu.py --device cuda --models EleutherAI/polyglot-ko-1.3b --precisions 4bit
    python benchmarks/bench_gpu.py --device cpu --models skt/kogpt2-base-v2 --stages sft --precisions bf16 \\
        --seq-len 32 --batch-size 1 --steps 3   # CPU smoke test of the code path (RSS, no fit-check error)

Disk: the random checkpoints are written in bf16 (12.8B: ~26 GB); `--scratch-models-keep` keeps them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import harness
import models

MODELS = (
    "skt/kogpt2-base-v2",
    "EleutherAI/polyglot-ko-1.3b",
    "EleutherAI/polyglot-ko-5.8b",
    "EleutherAI/polyglot-ko-12.8b",
)
PRECISIONS = {"bf16": {}, "8bit": {"load_in_8bit": True}, "4bit": {"load_in_4bit": True}}
STAGES = ("sft", "rm", "ppo", "generate")
RECIPE_STAGES = ("sft", "rm", "ppo")
TEMPLATE = "kochatgpt_short"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated fit-check presets")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: bf16, 8bit, 4bit")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row (PPO: the query)")
    parser.add_argument("--response-length", type=int, default=128, help="PPO answer tokens")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (PPO: updates) per run; first is warm-up")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--scratch-models-keep", action="store_true", help="keep the random checkpoints")
    harness.add_common_arguments(parser, repeats=1)
    args = parser.parse_args(argv)
    args.models = harness.choices_list("--models", args.models)
    args.precisions = harness.choices_list("--precisions", args.precisions, list(PRECISIONS))
    args.stages = harness.choices_list("--stages", args.stages, STAGES)
    return args


def recipe_config(stage: str, precision: str, args: argparse.Namespace, model_dir: Path, data: Path) -> dict[str, Any]:
    """The recipe config of one cell: LoRA everywhere, bf16 weights + bf16 autocast (CPU too), fixed-length rows."""
    config = harness.load_stage_config(stage)
    config.update(
        {
            "model_name_or_path": str(model_dir),
            "dataset_name": str(data),
            "template": TEMPLATE,
            "init_tiny": False,
            "overwrite": True,
            "eval_strategy": "no",
            "save_strategy": "no",
            "disable_tqdm": True,
            "report_to": "none",
            "use_peft": True,
            "lora_r": args.lora_r,
            "lora_alpha": 2 * args.lora_r,
            "lora_dropout": 0.05,
            "lora_modules_to_save": None,
            "dtype": "bfloat16",
            "bf16": True,
            "use_cpu": args.device == "cpu",
            "per_device_train_batch_size": args.batch_size,
            "gradient_checkpointing": args.gradient_checkpointing,
            "logging_steps": 1,
            **PRECISIONS[precision],
        }
    )
    if stage == "ppo":
        config.update(
            {
                "reward_model_path": str(model_dir),
                "total_episodes": args.batch_size * args.steps,
                "local_rollout_forward_batch_size": args.batch_size,
                "num_mini_batches": 1,
                "response_length": args.response_length,
                "eval_fraction": 0.2,
                "eval_prompts": args.batch_size,
                "eval_samples_per_prompt": 1,
            }
        )
    else:
        config.update({"max_steps": args.steps, "max_length": args.seq_len, "eval_fraction": 0.0})
    return config


def fit_estimate(preset: str, stage: str, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    from kochat_trl.fitcheck.estimate import estimate
    from kochat_trl.fitcheck.presets import resolve_model_config
    from kochat_trl.fitcheck.settings import FitSettings

    settings = FitSettings(
        dtype="bf16",
        quantization=None if precision == "bf16" else precision,
        lora=True,
        lora_r=args.lora_r,
        lora_dropout=0.05,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        response_length=args.response_length,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    result = estimate(resolve_model_config(preset), stage, settings)
    return {"tensor_bytes": result.tensor_bytes, "total_bytes": result.total_bytes}


def run_cell(spec: dict[str, Any], args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    gate = harness.Gate.from_args(args)
    load, waited = gate.wait_quiet()
    result = harness.run_worker(spec, harness.worker_env(args.threads), args.timeout, scratch)
    result.update({"load1_before": round(load, 2), "waited_s": round(waited, 1)})
    error = result.get("error") or ""
    result["status"] = (
        "ok" if result["ok"] else "OOM" if "OutOfMemoryError" in error or "out of memory" in error else "error"
    )
    return result


def render(cells: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    rows = []
    for cell in cells:
        result, fit = cell["result"], cell.get("fit")
        measured = result.get("peak_cuda_bytes")
        error = None
        if fit and measured:
            error = f"{100 * (fit['tensor_bytes'] - measured) / measured:+.1f} %"
        speed = result.get("throughput")
        rows.append(
            [
                cell["model"],
                cell["precision"],
                cell["stage"],
                result["status"],
                f"{harness.fmt(speed, 2)} {result.get('throughput_unit', '')}" if speed else "–",
                result.get("step_s"),
                harness.memory_text(result) if result["ok"] else "–",
                f"{fit['tensor_bytes'] / harness.GIB:.2f} GiB" if fit else "–",
                error,
                f"{100 * result['trainable_share']:.3f} %" if result.get("trainable_share") else "–",
            ]
        )
    memory = "peak CUDA allocated" if machine["device"] == "cuda" else "peak RSS"
    table = harness.markdown_table(
        [
            "model",
            "weights",
            "stage",
            "status",
            "throughput",
            "s/step",
            memory,
            "fit-check tensors",
            "fit-check error",
            "trainable",
        ],
        rows,
    )
    where = machine.get("gpu", machine["cpu"])
    return f"### Random-init target architectures + LoRA ({where})\n\n{table}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch, machine = harness.start(args, "gpu")
    cells: list[dict[str, Any]] = []
    for preset in args.models:
        started = time.perf_counter()
        model_dir = models.random_model(preset, scratch / "models", args.device, "bfloat16")
        print(
            f"[bench] {preset}: {models.model_params(model_dir):,} params, random bf16 checkpoint in "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
        data = {}
        for stage in RECIPE_STAGES:
            count = 4 * args.batch_size * args.steps
            records = models.fixed_length_records(stage, model_dir, TEMPLATE, args.seq_len, count)
            data[stage] = scratch / f"{stage}-{args.seq_len}.json"
            data[stage].write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        base = {"device": args.device, "threads": args.threads, "model_dir": str(model_dir), "warmup": 1}
        for precision in args.precisions:
            for stage in args.stages:
                if stage == "generate":
                    if precision != "bf16":
                        continue  # Generator loads merged bf16 models; k-bit generation is not a recipe path
                    settings = {
                        "prompts": 4 * args.batch_size,
                        "batch_size": args.batch_size,
                        "max_new_tokens": args.response_length,
                    }
                    prompts = [record["prompt"] for record in json.loads(data["ppo"].read_text())][
                        : settings["prompts"]
                    ]
                    spec = {
                        **base,
                        "role": "ours",
                        "stage": "generate",
                        "template": TEMPLATE,
                        "prompts": prompts,
                        "texts": [],
                        "generate": settings,
                    }
                    fit = None
                else:
                    spec = {
                        **base,
                        "role": "ours",
                        "stage": stage,
                        "config": recipe_config(stage, precision, args, model_dir, data[stage]),
                    }
                    fit = fit_estimate(preset, stage, precision, args)
                result = run_cell(spec, args, scratch / "runs" / f"{preset.split('/')[-1]}-{precision}-{stage}")
                cell = {"model": preset, "precision": precision, "stage": stage, "result": result, "fit": fit}
                cells.append(cell)
                estimate = f"fit-check {fit['tensor_bytes'] / harness.GIB:.2f} GiB" if fit else ""
                measured = harness.memory_text(result) if result["ok"] else ""
                print(f"[bench] {preset} {precision} {stage}: {result['status']}  {measured}  {estimate}", flush=True)
                if result["status"] == "error":
                    print(result["error"][-1500:], file=sys.stderr)
        if not args.scratch_models_keep:
            shutil.rmtree(model_dir, ignore_errors=True)
    markdown = render(cells, machine)
    print("\n" + markdown)
    payload = {
        "benchmark": "gpu",
        "command": harness.command_line(),
        "machine": machine,
        "settings": {
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "response_length": args.response_length,
            "lora_r": args.lora_r,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        "cells": cells,
    }
    harness.finish(args, scratch, f"gpu-{args.device}", payload, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
