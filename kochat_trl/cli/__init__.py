"""`kochat-trl` command line: thin argument handling over the library modules.

Each submodule registers its subcommands (the training recipes' commands hand their arguments to the recipe's own
TrlParser); heavy libraries are imported inside the handlers so
`kochat-trl --help` answers instantly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kochat_trl import __version__
from kochat_trl.errors import EXIT_USER_ERROR, KochatError, Stopped, print_error_line
from kochat_trl.recipes import RECIPES


def build_parser() -> argparse.ArgumentParser:
    from kochat_trl.cli import data, export, fitcheck, generate, merge, methods, pipeline, tiny, train, ui

    parser = argparse.ArgumentParser(
        prog="kochat-trl",
        description="Korean RLHF (SFT -> reward model -> PPO, RLOO/GRPO, DPO/KTO/ORPO) on Hugging Face TRL and PEFT.",
    )
    parser.add_argument("--version", action="version", version=f"kochat-trl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (pipeline, train, methods, data, tiny, merge, export, generate, fitcheck, ui):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from kochat_trl.run.console import quiet_libraries

    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in RECIPES:  # the recipe's TrlParser reads the rest, --help included
        from kochat_trl.cli import train

        return train.run(arguments[0], arguments[1:])
    quiet_libraries(verbose="--verbose" in arguments)  # before any ML library is imported
    args = build_parser().parse_args(arguments)
    try:
        return args.handler(args) or 0
    except KochatError as error:
        print_error_line(f"kochat-trl: error: {error}")
        return EXIT_USER_ERROR
    except Stopped as stop:  # a signal during training: the checkpoint is saved, rerun to continue
        print_error_line(f"kochat-trl: stopped: {stop}")
        return stop.exit_code
    except KeyboardInterrupt as interrupt:  # a second Ctrl-C (resume.StoppedAtOnce) or one outside training
        print_error_line(f"kochat-trl: stopped: {interrupt or 'interrupted'}")
        return getattr(interrupt, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
