"""SFT the KoChatGPT way (full fine-tune, every row padded to 512) vs ours (LoRA, dynamic padding / padding-free).

All variants train on the same rows (the bundled SFT data formatted with the shipped template), with the same
model, learning rate, batch size and number of steps, alternately in fresh processes:

- `kochatgpt`: a plain `transformers.Trainer`, full fine-tune, rows tokenized with `padding="max_length"` to
  512 and the prompt masked with -100, as the KoChatGPT tutorial's SFT stage does;
- `ours-full`: `kochat_trl/recipes/sft.py`, full fine-tune, dynamic padding (the tiny default's setting);
- `ours-lora`: `kochat_trl/recipes/sft.py` with LoRA (r 16, the architecture's attention projections), dynamic padding;
- `ours-lora-padfree`: the same with TRL's `padding_free` (one flattened row per batch, no pad tokens).

tokens/s counts real (non-pad) tokens, so padding shows up as lost throughput.

    python benchmarks/bench_kochatgpt.py --model tiny
    python benchmarks/bench_kochatgpt.py --model kogpt2-random
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import harness
import models

VARIANTS = ("kochatgpt", "ours-full", "ours-lora", "ours-lora-padfree")
PAD_TO = 512
PROFILES = {
    "tiny": {"max_steps": 20, "per_device_train_batch_size": 16},
    "small": {"max_steps": 4, "per_device_train_batch_size": 4},
    "gpu": {"max_steps": 20, "per_device_train_batch_size": 8},
}
VARIANT_SETTINGS = {
    "kochatgpt": {},
    "ours-full": {"use_peft": False},
    "ours-lora": {"use_peft": True},
    # TRL refuses max_length without packing here (it could not truncate a flattened batch); no row is longer.
    "ours-lora-padfree": {"use_peft": True, "padding_free": True, "max_length": None},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny, kogpt2-random, or a fit-check preset (random weights)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    parser.add_argument("--profile", choices=tuple(PROFILES), default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    harness.add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.variants = harness.choices_list("--variants", args.variants, VARIANTS)
    args.profile = args.profile or harness.default_profile(args)
    return args


def base_config(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    config = harness.load_stage_config("sft")
    config.update(
        {
            "eval_strategy": "no",
            "save_strategy": "no",
            "disable_tqdm": True,
            "report_to": "none",
            "init_tiny": False,
            "overwrite": True,
            "eval_fraction": 0.0,
            "max_length": PAD_TO,
            "model_name_or_path": str(model_dir),
        }
    )
    config.update(PROFILES[args.profile])
    if args.steps:
        config["max_steps"] = args.steps
    if args.batch_size:
        config["per_device_train_batch_size"] = args.batch_size
    if args.device == "cuda":
        config.update({"bf16": True, "dtype": "bfloat16"})
    else:
        config["use_cpu"] = True
    return config


def render(model: str, summaries: dict[str, dict[str, Any]], machine: dict[str, Any]) -> str:
    baseline = summaries.get("kochatgpt")
    memory_key = "peak_cuda_bytes" if machine["device"] == "cuda" else "peak_rss_bytes"
    rows = []
    for label, s in summaries.items():
        rows.append(
            [
                label,
                f"{harness.fmt(s['throughput'], 1)} tok/s",
                s["step_s"],
                s["tokens_per_step"],
                harness.memory_cell(s),
                harness.share_text(s),
                s["train_loss"],
                harness.ratio(s["throughput"], baseline["throughput"]) if baseline else None,
                harness.ratio(s[memory_key], baseline[memory_key]) if baseline else None,
                f"{s['runs_clean']}/{s['runs_total']}",
                s["load1_before"],
                f"{100 * (s['foreign_cpu'] or 0):.1f} %",
            ]
        )
    memory = "peak CUDA allocated" if machine["device"] == "cuda" else "peak RSS"
    table = harness.markdown_table(
        [
            "variant",
            "real tokens/s",
            "s/step",
            "real tokens/step",
            memory,
            "trainable",
            "train loss",
            "speed vs KoChatGPT",
            "memory vs KoChatGPT",
            "clean runs",
            "load1",
            "foreign CPU",
        ],
        rows,
    )
    where = f"{machine['device']}, {machine['torch_threads']} threads"
    return f"### {model}: KoChatGPT-style SFT vs ours ({where})\n\n{table}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch, machine = harness.start(args, "kochatgpt")
    model_dir = models.model_folder(args.model, scratch / "models", args.device)
    from transformers import AutoConfig

    from kochat_trl.models.lora import lora_target_modules

    config = base_config(args, model_dir)
    rows_path = scratch / "sft-rows.json"
    rows_path.write_text(json.dumps(models.stage_rows("sft", config, model_dir), ensure_ascii=False))
    base = {
        "stage": "sft",
        "device": args.device,
        "threads": args.threads,
        "model_dir": str(model_dir),
        "warmup": 1,
        "rows": str(rows_path),
        "pad_to": PAD_TO,
        "lora_targets": lora_target_modules(AutoConfig.from_pretrained(model_dir)),
    }
    variants = [
        harness.Variant(
            name,
            {
                **base,
                "role": "kochatgpt" if name == "kochatgpt" else "ours",
                "config": {**config, **VARIANT_SETTINGS[name]},
            },
        )
        for name in args.variants
    ]
    print(
        f"[bench] model {args.model} at {model_dir}; {', '.join(args.variants)} alternating, {args.repeats} each",
        flush=True,
    )
    harness.run_alternating(variants, args, scratch / "runs")
    summaries = {variant.label: harness.summarize(variant) for variant in variants}
    markdown = render(args.model, summaries, machine)
    print("\n" + markdown)
    name = f"kochatgpt-{args.model.split('/')[-1]}-{args.device}"
    payload = {
        "benchmark": "kochatgpt",
        "command": harness.command_line(),
        "model": args.model,
        "params": models.model_params(model_dir),
        "settings": config,
        "pad_to": PAD_TO,
        "machine": machine,
        "gate": vars(harness.Gate.from_args(args)),
        "summary": summaries,
        "runs": {variant.label: variant.runs for variant in variants},
    }
    harness.finish(args, scratch, name, payload, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
