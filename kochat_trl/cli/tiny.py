"""`kochat-trl init-tiny`: build the embedded default model."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "init-tiny",
        help="build the embedded tiny Korean model + tokenizer into a folder",
        description="Train a byte-level BPE tokenizer on the bundled Korean data and build a tiny Llama "
        "from a config; the folder then loads with from_pretrained like any hub model.",
    )
    parser.add_argument("output_dir", metavar="OUTDIR")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTDIR")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kochat_trl.models.tiny import init_tiny

    path = init_tiny(args.output_dir, seed=args.seed, overwrite=args.overwrite)
    print(f"tiny model and tokenizer written to {path}")
    return 0
