"""A recipe that runs one of several TRL trainers (RLOO or GRPO; DPO, KTO or ORPO), picked by `trainer`.

Each trainer has its own config class, so the name is read from the command line (`--trainer NAME`) or the
YAML config (`trainer: NAME`) before the arguments are parsed, and the parser is built for that class.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any


def requested_trainer(args: Sequence[str], default: str) -> str:
    """The trainer a command line asks for: `--trainer NAME` beats the config file's `trainer:`."""
    import yaml

    for index, arg in enumerate(args):
        if arg == "--trainer" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--trainer="):
            return arg.split("=", 1)[1]
    if "--config" in args[:-1]:
        from kochat_trl.config.files import resolve_config
        from kochat_trl.errors import ConfigError

        try:  # a path, or a bundled config's name, as the recipe's parsing resolves it
            config = yaml.safe_load(resolve_config(args[list(args).index("--config") + 1]).read_text(encoding="utf-8"))
        except (ConfigError, OSError, yaml.YAMLError):
            return default  # the recipe's argument parsing reports the unreadable config
        if isinstance(config, dict) and config.get("trainer"):
            return str(config["trainer"])
    return default


def switch_parser(
    script_arguments: type, config_class_of: Callable[[str], type], default: str, trainer: str | None = None
) -> Any:
    """`TrlParser` over (script_arguments, the trainer's config class, ModelConfig).

    `config_class_of(name)` raises a ConfigError for an unknown name; `trainer` only picks the class the parser
    starts with (for --help), the arguments given to `parse_args_and_config` decide.
    """
    from trl import ModelConfig, TrlParser

    class SwitchParser(TrlParser):
        def __init__(self, name: str) -> None:
            self.trainer = name
            super().__init__((script_arguments, config_class_of(name), ModelConfig))

        def parse_args_and_config(self, args: Sequence[str] | None = None, **kwargs: Any) -> tuple:
            args = list(sys.argv[1:] if args is None else args)
            name = requested_trainer(args, self.trainer)
            if name == self.trainer:
                return super().parse_args_and_config(args, **kwargs)
            # Arguments given in-process (tests, a pipeline) ask for another trainer: parse with its config,
            # keeping what a caller set on this parser (kochat_trl.recipes.steps sets error and allow_abbrev).
            other = SwitchParser(name)
            other.__dict__.update({key: value for key, value in vars(self).items() if key in ("error", "allow_abbrev")})
            return other.parse_args_and_config(args, **kwargs)

    return SwitchParser(trainer or requested_trainer(sys.argv[1:], default))
