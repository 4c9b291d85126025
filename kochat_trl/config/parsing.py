"""Reading a recipe's YAML config and command line into its dataclasses, with one-line errors for every mistake."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

from kochat_trl.config.files import resolve_config
from kochat_trl.errors import ConfigError


def parse_recipe_args(parser: Any, argv: Sequence[str] | None = None) -> tuple:
    """`TrlParser.parse_args_and_config`, with config mistakes turned into one-line errors.

    TrlParser takes YAML values as argparse defaults: strings are converted and fail with the whole
    usage text, other values (a list for a float, 1.5 for an int, an unknown choice) pass unchecked.
    Both are checked here and named by file and key.
    """
    from kochat_trl.config.ranges import check_ranges

    args = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    if "--config" in args[:-1]:  # a bundled name (tiny/sft.yaml) becomes the packaged file's path for TrlParser
        where = args.index("--config") + 1
        config_path = args[where] = str(resolve_config(args[where]))
    config = _read_yaml_config(config_path) if config_path else {}
    actions = {action.dest: action for action in parser._actions}
    _check_config_values(config, actions, config_path)
    check_ranges(parser, config, config_path, args)  # before the dataclasses: some crash on such values
    on_command_line = {arg[2:].split("=")[0].replace("-", "_") for arg in args if arg.startswith("--")}

    def one_line_error(message: str) -> None:  # replaces argparse's usage dump + exit
        if not message.startswith("argument --"):
            raise ConfigError(message)
        option, _, problem = message.removeprefix("argument ").partition(": ")
        key = option.split("/")[0].removeprefix("--").replace("-", "_")
        if key in config and key not in on_command_line:
            raise ConfigError(f"{config_path}: {key}: {problem}")
        raise ConfigError(f"--{key}: {problem}")

    parser.error = one_line_error
    parser.allow_abbrev = False  # argparse would silently take a typo such as --learning_rat for --learning_rate
    try:
        parsed = parser.parse_args_and_config(args)
    except (ValueError, TypeError) as error:
        text = str(error).replace("\n", " ")
        if "8 bit and 4 bit" in text:  # trl's ModelConfig names neither flag
            raise ConfigError("load_in_8bit and load_in_4bit are both set; choose one") from None
        if "arguments are not used" in text:  # HfArgumentParser's wording for unknown command-line options
            unknown = [name.replace("-", "_") for name in re.findall(r"'--([\w-]+)'", text)]
            raise ConfigError(f"unknown option(s) {_with_suggestions(unknown, actions)}") from None
        where = f"{config_path}: " if config_path else ""
        raise ConfigError(f"{where}{text}") from None
    # trl 1.x keeps trust_remote_code on the trainer configs (SFT, RM, RLOO, GRPO), not on ModelConfig,
    # which is what the loaders read: hand it over so the YAML setting is not silently ignored.
    trust_remote_code = any(getattr(part, "trust_remote_code", False) for part in parsed)
    for part in parsed:
        if hasattr(part, "model_name_or_path"):
            part.trust_remote_code = trust_remote_code or getattr(part, "trust_remote_code", False)
    return parsed


def _read_yaml_config(config_path: str) -> dict[str, Any]:
    """The --config file (a path, or a bundled config's name) as a mapping of setting: value."""
    import yaml

    path = resolve_config(config_path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{config_path}: {where}invalid YAML ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: must be a YAML mapping of setting: value")
    return config


def _with_suggestions(names: Sequence[str], actions: dict[str, Any]) -> str:
    import difflib

    parts = []
    for name in names:
        close = difflib.get_close_matches(name, list(actions), n=1)
        parts.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return ", ".join(parts)


def _check_config_values(config: dict[str, Any], actions: dict[str, Any], config_path: str | None) -> None:
    """Unknown keys, wrong types and values outside a field's choices in the YAML config."""
    unknown = [key for key in config if key not in actions and key != "env"]
    if unknown:
        raise ConfigError(f"{config_path}: unknown key(s) {_with_suggestions(unknown, actions)}; fix or remove them")
    expected = {"int": "an integer", "float": "a number", "string_to_bool": "true or false"}  # by argparse type
    for key, value in config.items():
        action = actions.get(key)
        if action is None or value is None:
            continue
        kind = getattr(action.type, "__name__", None)  # HfArgumentParser's (and TRL's copy's) string_to_bool
        many = action.nargs in ("+", "*")
        if isinstance(value, (list, dict)) and not many and kind in expected:
            raise ConfigError(f"{config_path}: {key}: expected {expected[kind]}, got {value!r}")
        for item in value if many and isinstance(value, list) else [value]:
            wrong_type = (
                (kind == "int" and (not isinstance(item, int) or isinstance(item, bool)))
                or (kind == "float" and (not isinstance(item, (int, float)) or isinstance(item, bool)))
                or (kind == "string_to_bool" and not isinstance(item, bool))
            )
            if wrong_type and not isinstance(item, str):  # strings are converted (and checked) by argparse
                raise ConfigError(f"{config_path}: {key}: expected {expected[kind]}, got {item!r}")
            if action.choices and str(item) not in {str(choice) for choice in action.choices}:
                choices = ", ".join(str(choice) for choice in action.choices)
                raise ConfigError(f"{config_path}: {key}: {item!r} is not one of {choices}")


def verbose_requested(args: Sequence[str]) -> bool:
    """`--verbose` / `--verbose true` on the command line, else `verbose: true` in the --config file."""
    for index, arg in enumerate(args):
        if arg == "--verbose":
            value = args[index + 1] if index + 1 < len(args) and not args[index + 1].startswith("--") else "true"
            return value.lower() in ("true", "1", "yes")
        if arg.startswith("--verbose="):
            return arg.split("=", 1)[1].lower() in ("true", "1", "yes")
    if "--config" in args[:-1]:
        try:
            config = _read_yaml_config(args[list(args).index("--config") + 1])
        except ConfigError:
            return False  # the recipe's parsing reports the unreadable config
        return config.get("verbose") is True
    return False
