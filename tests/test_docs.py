"""Every command that README.md and docs/*.md show is checked here, so the documentation cannot go stale.

Each fenced ```bash block is read line by line (comments dropped, `\\` continuations joined, `&&` chains split), and
every command must match one of the rules below, or the test fails and names it:

- `kochat-trl <stage> …` (sft, rm, ppo, rloo, grpo, dpo) and `python recipes/<stage>.py …`: parsed by the stage's own
  TrlParser with its `--config` read, as the recipe parses them before it loads anything, so a renamed flag, YAML key
  or config file fails; `--launch` names an accelerate config that exists, and `--launch_args` parse as
  `accelerate launch` flags.
- `kochat-trl <command> …`: parsed (not run) by the real `kochat-trl` parser; a `--config` must resolve.
- `accelerate launch …`: accelerate's own launch parser, the `--config_file`, and the recipe after `-m` as above.
- `python benchmarks/… | scripts/…`: the script exists and its own argparse parser accepts the arguments.
- `pip install …`: every extra exists in pyproject.toml; `python -m pytest -m EXPR`: every marker is declared.
- a few outside tools (llama-cli, ollama, tensorboard): listed in OUTSIDE_TOOLS, not checked.

A block after a `<!-- runnable -->` line is also run for real, in-process, in a folder whose `runs/tiny` holds the
session's pipeline run; `<!-- runnable slow -->` blocks train, so they run in the slow tier, in an empty folder.
"""

from __future__ import annotations

import argparse
import io
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
README_MAX_LINES = 250
RUNNABLE = re.compile(r"<!--\s*runnable(?:\s+(slow))?\s*-->")

# Files the docs name as the reader's own: parsed with a bundled stand-in so the rest of the command is still checked.
READERS_FILES = {"my_sft.yaml": "tiny/sft.yaml"}
# Outside programs the docs show next to ours; nothing of ours to check in them.
OUTSIDE_TOOLS = {"llama-cli", "ollama", "tensorboard"}
# Shell set-up steps with nothing of ours in them.
SHELL_STEPS = {(".",), ("source",), ("python3", "-m", "venv"), ("python", "-m", "venv")}
RECIPE_SCRIPTS = {"sft": "sft", "reward": "rm", "ppo": "ppo", "rl": "rloo", "dpo": "dpo"}  # module -> command


@dataclass(frozen=True)
class Command:
    where: str  # file:line of the command
    block: str  # file:line of its block's first line
    argv: tuple[str, ...]
    runnable: str | None  # None, "default" or "slow"


def bash_blocks(path: Path) -> list[tuple[int, list[str], str | None]]:
    """(line number, lines, runnable tier) of every ```bash block in `path`."""
    blocks, lines = [], path.read_text(encoding="utf-8").split("\n")
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```bash":
            marker = RUNNABLE.fullmatch(lines[index - 1].strip()) if index else None
            end = lines.index("```", index + 1)
            tier = None if marker is None else (marker.group(1) or "default")
            blocks.append((index + 2, lines[index + 1 : end], tier))
            index = end
        index += 1
    return blocks


def commands_in(path: Path) -> list[Command]:
    """Every command of every bash block: comments dropped, continuations joined, `&&` chains split."""
    found = []
    for first_line, lines, tier in bash_blocks(path):
        text = "\n".join(lines).replace("\\\n", " ")
        for offset, line in enumerate(text.split("\n")):
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                name = path.relative_to(REPO)
                found.append(Command(f"{name}:{first_line + offset}", f"{name}:{first_line}", tuple(words[:cut]), tier))
                words = words[cut + 1 :]
    return found


ALL_COMMANDS = [command for path in DOCS for command in commands_in(path)]


def _id(command: Command) -> str:
    return f"{command.where}:{' '.join(command.argv[:3])}"


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the docs' relative paths (recipes/configs/…, accelerate_configs/…) are the checkout's


# --- the checks, one per kind of command ---


def check_recipe(command: str, argv: list[str]) -> None:
    """`kochat-trl <stage> ARGV` as the recipe would parse it before loading a model."""
    import torch

    from kochat_trl.cli.launcher import read_accelerate_config, split_launch_arguments
    from kochat_trl.config.parsing import parse_recipe_args
    from kochat_trl.recipes import recipe_arguments, recipe_module

    options, argv = split_launch_arguments(argv)
    if "--launch" in options:
        read_accelerate_config(options["--launch"])
        launch_args = [*shlex.split(options.get("--launch_args", "")), "-m", "kochat_trl.recipes.sft"]
        check_accelerate_flags(launch_args)
    argv = [READERS_FILES.get(arg, arg) for arg in argv]
    if not torch.cuda.is_available():  # the real-model configs ask for bf16, which TrainingArguments refuses on CPU
        argv += ["--bf16", "false"]
    parse_recipe_args(recipe_module(command).make_parser(), recipe_arguments(command, argv))


def check_kochat(argv: list[str]) -> None:
    from kochat_trl.config.files import resolve_config
    from kochat_trl.recipes import RECIPES

    if argv[0] in RECIPES:
        check_recipe(argv[0], argv[1:])
        return
    from kochat_trl.cli import build_parser

    try:
        exact(build_parser()).parse_args(argv)
    except SystemExit as stop:
        pytest.fail(f"kochat-trl {' '.join(argv)}: the parser refused it (exit {stop.code})")
    if "--config" in argv:
        resolve_config(READERS_FILES.get(argv[argv.index("--config") + 1], argv[argv.index("--config") + 1]))


def exact(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` and its subcommands without abbreviations: a documented `--gpu-memory` must not pass as a prefix of
    a renamed `--gpu-memory-gib`."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                exact(subparser)
    return parser


def check_accelerate_flags(argv: list[str]) -> argparse.Namespace:
    from accelerate.commands.launch import launch_command_parser

    try:
        return exact(launch_command_parser()).parse_args(argv)
    except SystemExit as stop:
        pytest.fail(f"accelerate launch {' '.join(argv)}: accelerate's parser refused it (exit {stop.code})")


def check_accelerate_launch(argv: list[str]) -> None:
    from kochat_trl.cli.launcher import read_accelerate_config
    from kochat_trl.recipes import RECIPES

    args = check_accelerate_flags(argv)
    read_accelerate_config(args.config_file)
    assert args.module, "the docs launch the recipes as modules: -m kochat_trl.recipes.<stage>"
    module = args.training_script.removeprefix("kochat_trl.recipes.")
    command = RECIPE_SCRIPTS.get(module)
    assert command in RECIPES, f"-m {args.training_script}: not a recipe module"
    check_recipe(command, args.training_script_args)


class _Parsed(Exception):
    """Raised in place of running a script once its parser has accepted the arguments."""


def check_script(path: str, argv: list[str], monkeypatch) -> None:
    script = REPO / path
    assert script.is_file(), f"{path}: no such script"
    if script.parent.name == "recipes":
        check_recipe(RECIPE_SCRIPTS[script.stem], argv)
        return
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse_args(exact(self), args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    monkeypatch.syspath_prepend(str(script.parent))  # the benchmarks import their siblings
    try:
        runpy.run_path(str(script), run_name="__main__")
    except _Parsed:
        return
    except SystemExit as stop:
        pytest.fail(f"{path} {' '.join(argv)}: its parser refused it (exit {stop.code})")
    pytest.fail(f"{path}: ran without parsing a command line")


def check_pip_install(argv: list[str]) -> None:
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")  # no tomllib before Python 3.11
    section = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))
    assert {"test", "ui", "gguf"} <= extras
    for arg in argv:
        target = re.fullmatch(r"(?:\.|kochat-trl)\[([\w,-]+)\]", arg)
        if target:
            missing = set(target.group(1).split(",")) - extras
            assert not missing, f"pip install {arg}: no such extra {sorted(missing)} in pyproject.toml"


def check_pytest(argv: list[str], markers: list[str]) -> None:
    declared = {line.split(":")[0] for line in markers}
    for index, arg in enumerate(argv):
        if arg == "-m":
            named = set(re.findall(r"\w+", argv[index + 1])) - {"and", "or", "not"}
            assert named <= declared, f"-m {argv[index + 1]}: undeclared marker(s) {sorted(named - declared)}"


def check_command(argv: list[str], monkeypatch, markers: list[str]) -> None:
    """Dispatch one documented command to its check; an unknown kind of command fails."""
    head = argv[0]
    if head == "kochat-trl":
        check_kochat(argv[1:])
    elif head in ("python", "python3") and argv[1:3] == ["-m", "kochat_trl"]:
        check_kochat(argv[3:])
    elif head in ("python", "python3") and argv[1:3] == ["-m", "pytest"]:
        check_pytest(argv[3:], markers)
    elif head in ("python", "python3") and argv[1].split("/")[0] in ("recipes", "benchmarks", "scripts"):
        check_script(argv[1], argv[2:], monkeypatch)
    elif argv[:2] == ["accelerate", "launch"]:
        check_accelerate_launch(argv[2:])
    elif argv[:2] == ["pip", "install"]:
        check_pip_install(argv[2:])
    elif head in OUTSIDE_TOOLS or any(tuple(argv[: len(step)]) == step for step in SHELL_STEPS):
        pass
    else:
        pytest.fail(f"{' '.join(argv)}: a kind of command this test cannot check; add a rule to tests/test_docs.py")


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=_id)
def test_every_documented_command_parses(command, in_repo, monkeypatch, pytestconfig):
    check_command(list(command.argv), monkeypatch, pytestconfig.getini("markers"))


def test_the_docs_show_commands_of_every_kind():
    """The extraction itself: a broken fence or marker would otherwise leave nothing to check, and pass."""
    heads = {command.argv[0] for command in ALL_COMMANDS}
    assert {"kochat-trl", "python", "accelerate", "pip"} <= heads
    assert len(ALL_COMMANDS) >= 40
    assert {command.runnable for command in ALL_COMMANDS} == {None, "default", "slow"}


# --- the runnable blocks ---


def _runnable_blocks(tier: str) -> list[tuple[str, list[Command]]]:
    blocks: dict[str, list[Command]] = {}
    for command in ALL_COMMANDS:
        if command.runnable == tier:
            blocks.setdefault(command.block, []).append(command)
    return list(blocks.items())


DEFAULT_BLOCKS, SLOW_BLOCKS = _runnable_blocks("default"), _runnable_blocks("slow")


def run_block(commands: list[Command], folder: Path, monkeypatch) -> None:
    """Each command in-process (`kochat_trl.cli.main`), from `folder`; chat gets one question, then end of input."""
    from kochat_trl.cli import main

    monkeypatch.chdir(folder)
    for command in commands:
        assert command.argv[0] == "kochat-trl", f"{command.where}: a runnable block holds kochat-trl commands only"
        monkeypatch.setattr(sys, "stdin", io.StringIO("김치에 대해 알려 주세요.\n"))
        assert main(list(command.argv[1:])) == 0, f"{command.where}: {' '.join(command.argv)} failed"


@pytest.mark.parametrize("where,commands", DEFAULT_BLOCKS, ids=[where for where, _ in DEFAULT_BLOCKS])
def test_runnable_blocks_run(where, commands, pipeline_run, tmp_path, monkeypatch):
    runs = tmp_path / "runs" / "tiny"
    runs.mkdir(parents=True)
    for child in pipeline_run.dir.iterdir():  # linked one by one: what a block writes into runs/tiny stays here
        (runs / child.name).symlink_to(child)
    run_block(commands, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("where,commands", SLOW_BLOCKS, ids=[where for where, _ in SLOW_BLOCKS])
def test_runnable_slow_blocks_run(where, commands, tmp_path, monkeypatch):
    run_block(commands, tmp_path, monkeypatch)


# --- the pages themselves ---


def test_readme_is_short_and_links_every_docs_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme.count("\n") <= README_MAX_LINES
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, f"README's 'Where to read next' does not link docs/{page.name}"


def test_readme_test_command_is_the_one_ci_runs():
    readme_lines = [c.argv for c in commands_in(REPO / "README.md") if c.where.startswith("README.md")]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").split("\n")
    ci_command = ci[ci.index(next(line for line in ci if "README test command" in line)) + 1]
    readme_text = (REPO / "README.md").read_text(encoding="utf-8")
    assert ci_command in readme_text.split("\n"), "README's second command differs from .ci/run's"
    assert ("python", "-m", "pytest", "-q") in readme_lines


@pytest.mark.parametrize("page", sorted((REPO / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_page_opens_with_a_title_and_a_one_line_summary(page):
    lines = page.read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("# ") and lines[1] == "", f"{page.name}: starts with '# Title' and a blank line"
    summary = lines[2]
    assert summary and not summary.startswith(("#", "|", "```", "- ", "!", "<")), f"{page.name}: line 3 is the summary"
    assert lines[3] == "", f"{page.name}: the summary is one line"


def _headings(path: Path) -> set[str]:
    """GitHub's anchors for the headings of `path` (outside code fences)."""
    anchors: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            anchor, number = slug, 0
            while anchor in anchors:
                number += 1
                anchor = f"{slug}-{number}"
            anchors.add(anchor)
    return anchors


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_anchors_resolve(path):
    for link in _links(path):
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{path.name}: link {link}: no such file"
        if anchor:
            assert anchor in _headings(file), f"{path.name}: link {link}: no such heading in {file.name}"
