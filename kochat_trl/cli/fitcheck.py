"""`kochat-trl fit-check`: will a training stage fit on my GPU? Estimated peak memory per component."""

from __future__ import annotations

import argparse
import json

from kochat_trl.errors import KochatError


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "fit-check",
        help="estimate a stage's peak GPU memory and whether it fits",
        description="Count the model's parameters exactly (built on the meta device from its config, no weights "
        "needed), estimate weights, LoRA/optimizer states, activations and logits for one training step, and "
        "say whether it fits in --gpu-memory; if not, name the first knob that makes it fit.",
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="NAME_OR_CONFIG",
        help="local model folder or config.json, or skt/kogpt2-base-v2, EleutherAI/polyglot-ko-{1.3b,5.8b,12.8b}",
    )
    parser.add_argument(
        "--stage",
        required=True,
        choices=["sft", "rm", "ppo", "dpo"],
        help="dpo covers the policy and its reference (KTO and ORPO need no more)",
    )
    parser.add_argument("--gpu-memory", required=True, metavar="SIZE", help="e.g. 24GB (GB = GiB, as GPUs are sold)")
    parser.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes int8 weights (needs LoRA)")
    parser.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes nf4 weights (needs LoRA)")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True, help="LoRA (default) or full FT")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4, help="per-device batch (RM: pairs, PPO: rollouts)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (PPO: the query)")
    parser.add_argument("--response-length", type=int, default=128, help="PPO generated tokens")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--shared-base",
        action="store_true",
        help="PPO: reward and value models as LoRA adapters on the policy's one frozen base",
    )
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="weights and compute dtype")
    parser.add_argument("--json", action="store_true", help="print the machine-readable breakdown")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kochat_trl.fitcheck.estimate import estimate
    from kochat_trl.fitcheck.presets import resolve_model_config
    from kochat_trl.fitcheck.report import format_report
    from kochat_trl.fitcheck.settings import FitSettings, parse_memory
    from kochat_trl.fitcheck.suggest import suggest

    if args.load_in_8bit and args.load_in_4bit:
        raise KochatError("--load-in-8bit and --load-in-4bit are both set; choose one (4-bit uses the least memory)")
    if args.shared_base and args.stage != "ppo":
        raise KochatError(
            f"--shared-base shares the base between PPO's four models; it does not apply to --stage {args.stage}"
        )
    gpu_bytes = parse_memory(args.gpu_memory)
    settings = FitSettings(
        dtype=args.dtype,
        quantization="8bit" if args.load_in_8bit else "4bit" if args.load_in_4bit else None,
        lora=args.lora,
        lora_r=args.lora_r,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        response_length=args.response_length,
        gradient_checkpointing=args.gradient_checkpointing,
        shared_base=args.shared_base,
    )
    settings.validate()  # bad numbers fail before the (seconds long) model import
    config = resolve_model_config(args.model)
    result = estimate(config, args.stage, settings)
    fits = result.total_bytes <= gpu_bytes
    suggestion = None if fits else suggest(config, args.stage, settings, gpu_bytes)
    if args.json:
        payload = result.to_dict()
        payload.update(gpu_memory_bytes=gpu_bytes, fits=fits)
        if not fits:
            payload["suggestion"] = suggestion and {
                "flags": list(suggestion.flags),
                "total_bytes": suggestion.estimate.total_bytes,
            }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        print(format_report(result, gpu_bytes, suggestion))
    return 0
