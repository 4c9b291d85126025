"""`kochat-trl data convert|inspect`: Korean data files → TRL-ready JSON Lines, and a quick look."""

from __future__ import annotations

import argparse
from pathlib import Path

from kochat_trl.errors import KochatError

# The stage a layout most naturally feeds, for `inspect`.
_NATURAL_STAGE = {"rm": "rm", "pairs": "rm", "ppo": "ppo", "prompts": "ppo"}


def register(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="convert or inspect Korean data files")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    convert = actions.add_parser(
        "convert",
        help="write TRL-ready JSON Lines for one stage",
        description="sft -> {prompt, completion} (or {messages} for conversations); "
        "rm -> {prompt, chosen, rejected} (every ranked pair, ties skipped); ppo -> {prompt}. "
        "INPUT: JSON array or JSON Lines (any KoChatGPT/KoAlpaca/KULLM/messages layout), "
        "KoChatGPT conversation text, one prompt per line, bundled:sft|rm|ppo, or a hub dataset id.",
    )
    convert.add_argument("--stage", required=True, choices=["sft", "rm", "ppo"])
    convert.add_argument("input", metavar="INPUT")
    convert.add_argument("-o", "--output", required=True, metavar="OUTPUT.jsonl")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    convert.set_defaults(handler=run_convert)

    inspect = actions.add_parser("inspect", help="print layout, counts and token-length percentiles")
    inspect.add_argument("input", metavar="INPUT")
    inspect.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or hub id for length percentiles")
    inspect.add_argument("--template", help="prompt template for token lengths (default: the tokenizer chat template)")
    inspect.set_defaults(handler=run_inspect)


def run_convert(args: argparse.Namespace) -> int:
    from kochat_trl.data.layouts import load_stage_data, write_jsonl
    from kochat_trl.run.disk import writing_to

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise KochatError(f"{output}: already exists; pass --overwrite to replace it")
    loaded = load_stage_data(args.input, args.stage)
    with writing_to(output, "--output"):  # a full or read-only disk: one line naming the file, exit 2
        count = write_jsonl(loaded.rows, output)
    print(loaded.summary())
    print(f"wrote {count} {args.stage} rows to {output}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from kochat_trl.data.layouts import detect_layout, load_stage_data
    from kochat_trl.data.readers import read_records

    records, container = read_records(args.input)
    if not records:
        raise KochatError(f"{args.input}: no records found")
    layout = detect_layout(records, container, args.input)
    stage = _NATURAL_STAGE.get(layout, "sft")
    loaded = load_stage_data(args.input, stage)
    print(f"file:      {args.input}")
    print(f"container: {container}")
    print(f"layout:    {layout} (as {stage} data)")
    print(f"counts:    {loaded.summary()}")
    if args.tokenizer:
        for field, lengths in token_lengths(loaded.rows, args.tokenizer, args.template).items():
            print(f"tokens {field:<10} " + "  ".join(f"{name} {value}" for name, value in percentiles(lengths).items()))
    return 0


def token_lengths(rows: list[dict], tokenizer_path: str, template_name: str | None) -> dict[str, list[int]]:
    """Token counts per field; prompts are measured as the model sees them (rendered by the chat template)."""
    from transformers import AutoTokenizer

    from kochat_trl.data.templates import install_template, prompt_text

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except OSError as error:
        raise KochatError(f"{tokenizer_path}: cannot load a tokenizer ({error})") from None
    install_template(tokenizer, template_name, where=tokenizer_path)
    lengths: dict[str, list[int]] = {}
    for row in rows:
        if "messages" in row:
            *history, answer = row["messages"]
            texts = {"prompt": prompt_text(tokenizer, history), "completion": answer["content"]}
        else:
            texts = {**row, "prompt": prompt_text(tokenizer, row["prompt"])}
        for field, text in texts.items():
            lengths.setdefault(field, []).append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return lengths


def percentiles(values: list[int]) -> dict[str, int]:
    ordered = sorted(values)

    def at(fraction: float) -> int:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}
