"""`kochat-trl merge`: fold a LoRA adapter into its base and export a plain transformers model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kochat_trl.errors import KochatError


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model and save safetensors + tokenizer + model card",
        description="Loads the base in full precision (also for adapters trained on an 8-bit/4-bit base), "
        "applies the adapter, merges it (peft merge_and_unload) and writes a folder that loads with plain "
        "AutoModelForCausalLM / AutoModelForSequenceClassification.",
    )
    parser.add_argument("--adapter", required=True, metavar="PATH", help="folder with adapter_config.json")
    parser.add_argument("--base", metavar="PATH", help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the merged weights (default: float32)",
    )
    parser.add_argument("--metrics", metavar="FILE.json", help="extra metrics (a JSON object) for the model card")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTDIR")
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="also upload OUTDIR to this hub model repo (token from HF_TOKEN or `hf auth login`)",
    )
    parser.add_argument(
        "--gguf",
        choices=["f16", "q8_0"],
        metavar="QUANT",
        help="also write OUTDIR/OUTDIR-QUANT.gguf and its Modelfile (f16 or q8_0; pip install 'kochat-trl[gguf]')",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kochat_trl.models.export import merge_adapter, read_adapter_config

    if args.gguf:  # refused before minutes of merging, not after
        from kochat_trl.models.export_gguf import require_converter

        if read_adapter_config(args.adapter)["task_type"] != "CAUSAL_LM":
            raise KochatError(f"{args.adapter}: --gguf exports a chat model; this adapter is a reward model")
        require_converter()
    output = merge_adapter(
        args.adapter,
        args.output,
        base=args.base,
        dtype=args.dtype,
        overwrite=args.overwrite,
        push_to_hub=args.push_to_hub,
        metrics=_read_metrics(args.metrics),
    )
    print(f"merged {args.adapter} into its base ({args.dtype}); saved to {output}")
    if args.push_to_hub:
        print(f"uploaded to https://huggingface.co/{args.push_to_hub}")
    if args.gguf:
        from kochat_trl.cli.export import report
        from kochat_trl.models.export_gguf import export_gguf

        report(export_gguf(output, Path(output) / f"{Path(output).name}-{args.gguf}.gguf", args.gguf), args.gguf)
    return 0


def _read_metrics(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KochatError(f"{path}: metrics file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KochatError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(metrics, dict):
        raise KochatError(f"{path}: metrics must be a JSON object of name: value")
    return metrics
