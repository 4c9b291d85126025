"""`kochat-trl generate | compare-decoding | chat`: answers from a trained model, decoding side by side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kochat_trl.errors import KochatError

# Kept in sync with kochat_trl.eval.generation.DECODING_PRESETS (not imported here: it would slow down `--help`).
_PRESETS = "greedy, beam, sampling, top_k, top_p"


def _model_arguments(parser: argparse.ArgumentParser, strategy: bool = True) -> None:
    parser.add_argument("--model", required=True, metavar="PATH", help="model folder (SFT/PPO output or init-tiny)")
    parser.add_argument("--adapter", metavar="PATH", help="PEFT adapter folder to apply to --model")
    parser.add_argument(
        "--template",
        help="prompt template: kochatgpt, kochatgpt_short, koalpaca, kullm or chat (default: the chat template saved "
        "with the model's tokenizer, which is the one it was trained with)",
    )
    if strategy:
        parser.add_argument("--strategy", default="greedy", help=f"decoding preset: {_PRESETS} (default greedy)")
    parser.add_argument(
        "--gen",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra generate() option, repeatable; VALUE is parsed as JSON when it can be "
        "(e.g. --gen repetition_penalty=1.2 --gen top_k=20)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (sampling presets are reproducible)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit in tokens (default 64)")


def register(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser(
        "generate",
        help="answer one prompt with a trained model",
        description="Format PROMPT with the template, generate, print the answer.",
    )
    _model_arguments(generate)
    generate.add_argument("--prompt", required=True, help="the user's question (raw text, no template)")
    generate.set_defaults(handler=run_generate)

    compare = commands.add_parser(
        "compare-decoding",
        help="answer the same prompts with several decoding presets and compare them",
        description="Per prompt, one answer per strategy; per strategy, mean reward (with --reward-model), "
        "distinct-1/2, repeated bigram rate, mean length and tokens/s. Prompts default to held-out bundled "
        "PPO prompts.",
    )
    _model_arguments(compare, strategy=False)
    compare.add_argument(
        "--strategies", default=_PRESETS.replace(" ", ""), help=f"comma-separated (default all: {_PRESETS})"
    )
    compare.add_argument("--reward-model", metavar="PATH", help="reward model folder to score the answers")
    compare.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts in any layout `kochat-trl data` reads, or bundled:ppo (default: 4 held-out bundled PPO prompts)",
    )
    compare.add_argument("--num-prompts", type=int, metavar="N", help="use only the first N prompts of --prompts")
    compare.add_argument("--batch-size", type=int, default=8)
    compare.add_argument("--output", metavar="FILE.md", help="also write the comparison as Markdown")
    compare.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    compare.set_defaults(handler=run_compare)

    chat = commands.add_parser(
        "chat",
        help="multi-turn chat with a trained model in the terminal",
        description="Type a message and press Enter. Commands: /reset clears the "
        "history, /strategy NAME switches decoding, /exit (or Ctrl-D/Ctrl-C) quits.",
    )
    _model_arguments(chat)
    chat.set_defaults(handler=run_chat)


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise KochatError(f"{flag} must be at least 1, got {value}")


def _prepare(args: argparse.Namespace, strategies: list[str]) -> dict[str, Any]:
    """Check cheap arguments before any model loads; returns the parsed --gen overrides."""
    from transformers.utils import logging as hf_logging

    from kochat_trl.eval.generation import check_strategies, parse_generate_overrides

    check_strategies(strategies)
    _positive(args.max_new_tokens, "--max-new-tokens")
    overrides = parse_generate_overrides(args.gen)
    hf_logging.disable_progress_bar()  # the "Loading weights" bar would clutter answers and chat
    return overrides


def _load(args: argparse.Namespace):
    from kochat_trl.eval.generation import Generator

    return Generator.load(args.model, args.adapter, args.template)


def run_generate(args: argparse.Namespace) -> int:
    overrides = _prepare(args, [args.strategy])
    generator = _load(args)
    print(
        generator.answer(
            args.prompt, args.strategy, overrides=overrides, max_new_tokens=args.max_new_tokens, seed=args.seed
        )
    )
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from kochat_trl.eval import decoding

    strategies = [name.strip() for name in args.strategies.split(",") if name.strip()]
    overrides = _prepare(args, strategies)
    _positive(args.num_prompts, "--num-prompts")
    _positive(args.batch_size, "--batch-size")
    output = Path(args.output) if args.output else None
    if output is not None and output.exists() and not args.overwrite:
        raise KochatError(f"{output}: already exists; pass --overwrite to replace it")
    if args.prompts:
        prompts = decoding.load_prompts(args.prompts, args.num_prompts)
    else:
        prompts = decoding.default_prompts(args.num_prompts or decoding.DEFAULT_PROMPT_COUNT)
    result = decoding.compare_decoding(
        args.model,
        prompts,
        strategies,
        adapter=args.adapter,
        template=args.template,
        reward_model=args.reward_model,
        overrides=overrides,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    print_comparison(result)
    if output is not None:
        from kochat_trl.run.outputs import write_text_atomic

        write_text_atomic(decoding.render_markdown(result), output)
        print(f"wrote {output}")
    return 0


def print_comparison(result: Any, file: Any = None) -> None:
    """Rich tables: each prompt's answers by strategy, then the per-strategy summary."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from kochat_trl.eval.decoding import REPEAT_N, SHORT_SUMMARY_COLUMNS, summary_row

    console = Console(file=file or sys.stdout)
    for index, prompt in enumerate(result.prompts):
        table = Table(title=escape(f"{index + 1}. {prompt}"), show_lines=True, title_justify="left")
        table.add_column("strategy", style="bold", no_wrap=True)
        table.add_column("answer")
        for item in result.results:
            table.add_row(item.strategy, Text(item.answers[index]))  # Text: no markup parsing
        console.print(table)
    summary = Table(
        title="Summary per strategy",
        title_justify="left",
        caption=f"reward: mean RM reward; "
        f"dist-n: distinct-n; rep-{REPEAT_N}: repeated word {REPEAT_N}-gram rate; tokens, chars: mean "
        "answer length; tok/s: generated tokens per second; broken..repeat: the rule-based judge's rates (U+FFFD, "
        "Hangul share, 합니다체 ending, names the asked topic, repeats a word bigram)",
        caption_justify="left",
    )
    for column in SHORT_SUMMARY_COLUMNS:
        summary.add_column(column, justify="left" if column == "strategy" else "right")
    for item in result.results:
        summary.add_row(*(Text(value) for value in summary_row(item)))
    console.print(summary)


def run_chat(args: argparse.Namespace) -> int:
    from kochat_trl.eval.chat import chat_loop

    overrides = _prepare(args, [args.strategy])
    generator = _load(args)
    chat_loop(generator, sys.stdin, sys.stdout, args.strategy, overrides, args.max_new_tokens, args.seed)
    return 0
