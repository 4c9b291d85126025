"""`kochat-trl export`: a merged model folder as one GGUF file for llama.cpp, Ollama and LM Studio."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from kochat_trl.errors import print_error_line

if TYPE_CHECKING:
    from kochat_trl.models.export_gguf import GGUFExport


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export",
        help="write a merged model folder as a GGUF file (llama.cpp, Ollama, LM Studio) and an Ollama Modelfile",
        description="Converts with llama.cpp's converter (pip install 'kochat-trl[gguf]'); the file carries the "
        "tokenizer, its special tokens and the chat template. FILE.Modelfile is written beside it.",
    )
    parser.add_argument("merged_dir", metavar="MERGED_DIR", help="a folder written by kochat-trl merge (the policy)")
    parser.add_argument("-o", "--output", required=True, metavar="FILE.gguf")
    parser.add_argument("--format", default="gguf", choices=["gguf"], help="output format (default: gguf)")
    parser.add_argument("--quant", default="f16", choices=["f16", "q8_0"], help="weight type (default: f16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing FILE.gguf")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kochat_trl.models.export_gguf import export_gguf

    report(export_gguf(args.merged_dir, args.output, quant=args.quant, overwrite=args.overwrite), args.quant)
    return 0


def report(result: GGUFExport, quant: str) -> None:
    """What was written, and one warning line per part of the tokenizer no GGUF reader reproduces."""
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, {quant}) and {result.modelfile}")
    for gap in result.tokenizer_gaps:
        print_error_line(
            f"kochat-trl: warning: GGUF has no key for this tokenizer's {gap}; llama.cpp and other GGUF readers "
            "tokenize the text it applies to differently (the answers may differ there)"
        )
