"""The whole of RLHF in one command: SFT → reward model → PPO → merge → decoding comparison → held-out
conversations → report.

Each training stage runs its recipe (`kochat_trl.recipes.<stage>`) with the stage's YAML plus the paths that chain
the stages: the recipe's own `main()` in this process (imports paid once), or, when a `launcher` is
configured (`accelerate launch …`), the recipe module in a child process exactly as a user runs it. A stage
whose folder holds `metrics.json` (written last) is finished and skipped on rerun, so a crashed run
continues; an unfinished stage with a complete `checkpoint-N` resumes from the newest one instead of
starting over.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from kochat_trl.config.files import bundled_config, resolve_config
from kochat_trl.errors import ConfigError, KochatError
from kochat_trl.run.console import say
from kochat_trl.run.disk import writing_to
from kochat_trl.run.outputs import (
    atomic_output_dir,
    check_output_dir,
    read_json,
    remove_leftovers,
    remove_tree,
    stage_finished,
    write_json_atomic,
    write_text_atomic,
)

DEFAULT_CONFIG = bundled_config("tiny/pipeline.yaml")
TRAINING_STAGES = ("sft", "rm", "ppo")  # also the `kochat-trl` commands that train them
STATE_FILE = "pipeline_state.json"


@dataclass
class PipelineConfig:
    """What a pipeline YAML (e.g. the bundled `tiny/pipeline.yaml`) holds. A stage's recipe config is found next to
    the pipeline file, else from the current folder, else among the bundled configs; other paths are relative to
    the current folder."""

    output_dir: str = "runs/tiny"
    base_model: str | None = None  # None: build the embedded tiny default into OUTPUT_DIR/base
    seed: int = 0
    stages: dict[str, str] = field(default_factory=dict)  # stage -> recipe YAML
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> extra recipe settings
    launcher: list[str] = field(default_factory=list)  # e.g. ["accelerate", "launch", "--num_processes", "2"]
    decoding_strategies: list[str] = field(default_factory=lambda: ["greedy", "beam", "sampling", "top_k", "top_p"])
    decoding_prompts: int = 4
    methods: list[str] = field(default_factory=list)  # more alignment methods to compare with PPO, e.g. [dpo]

    @classmethod
    def load(cls, path: str | os.PathLike) -> PipelineConfig:
        import yaml

        path = resolve_config(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML ({error})".replace("\n", " ")) from None
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        config = cls(**raw)
        missing = [stage for stage in TRAINING_STAGES if stage not in config.stages]
        if missing:
            raise ConfigError(f"{path}: stages needs a recipe config for {', '.join(missing)}")
        from kochat_trl.eval.methods import METHODS

        unknown_methods = [name for name in config.methods if name not in METHODS or name == "ppo"]
        if unknown_methods:
            raise ConfigError(
                f"{path}: methods: {', '.join(map(str, unknown_methods))}; PPO is always compared, "
                f"add any of {', '.join(name for name in METHODS if name != 'ppo')}"
            )
        for stage, recipe_config in config.stages.items():
            if stage not in TRAINING_STAGES:
                raise ConfigError(f"{path}: unknown stage {stage!r}; stages are {', '.join(TRAINING_STAGES)}")
            try:
                config.stages[stage] = str(resolve_config(recipe_config, relative_to=path.parent))
            except ConfigError as error:
                raise ConfigError(f"{path}: stages.{stage}: {error}") from None
        return config


def _stage_arguments(stage: str, run_dir: Path, base: Path, resume: bool = False) -> list[str]:
    """The paths that chain the stages: SFT from the base, RM from SFT, PPO from SFT + RM; a fresh stage
    replaces what a failed attempt left, a resumed one continues from its newest checkpoint."""
    chained = {
        "sft": ["--model_name_or_path", str(base), "--init_tiny", "false"],
        "rm": ["--model_name_or_path", str(run_dir / "sft")],
        "ppo": ["--model_name_or_path", str(run_dir / "sft"), "--reward_model_path", str(run_dir / "rm")],
    }[stage]
    continuation = ["--resume_from_checkpoint", "last"] if resume else ["--overwrite", "true"]
    return [*chained, "--output_dir", str(run_dir / stage), *continuation]


def _override_arguments(overrides: dict[str, Any]) -> list[str]:
    """YAML values as recipe command-line flags (booleans as true/false, lists as JSON)."""
    arguments = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, (list, dict)):
            text = json.dumps(value)
        else:
            text = str(value)
        arguments += [f"--{key}", text]
    return arguments


def run_stage(
    stage: str, config: PipelineConfig, run_dir: Path, base: Path, resume: bool = False, verbose: bool = False
) -> None:
    """Run one recipe: in this process, or with the configured launcher in a child process (its output streams to
    the console as it trains). `resume`: continue from the newest complete checkpoint in the stage folder."""
    from kochat_trl.recipes import recipe_module

    recipe = recipe_module(stage)
    arguments = [
        "--config",
        config.stages[stage],
        *_stage_arguments(stage, run_dir, base, resume),
        *_override_arguments(config.overrides.get(stage, {})),
        *(["--verbose", "true"] if verbose else []),
    ]
    if not config.launcher:
        _run_in_process(stage, recipe, arguments, run_dir)
        return
    command = [*config.launcher, "-m", recipe.__name__, *arguments]
    if verbose:
        say(f"{stage}: {' '.join(command)}")
    result = subprocess.run(command)
    if result.returncode != 0:
        raise KochatError(
            f"stage {stage} failed (exit {result.returncode}); fix the error above and rerun: "
            f"finished stages in {run_dir} are kept"
        )


def _run_in_process(stage: str, recipe: ModuleType, arguments: list[str], run_dir: Path) -> None:
    """The recipe's `main()` with its parsed arguments, as `kochat-trl <stage> ...` would call it."""
    from kochat_trl.config.parsing import parse_recipe_args

    try:
        with writing_to(run_dir / stage):
            recipe.main(*parse_recipe_args(recipe.make_parser(), arguments))
    except KochatError as error:
        raise KochatError(f"stage {stage}: {error}; finished stages in {run_dir} are kept") from None


def _invalidate_after(stage: str, run_dir: Path, config: PipelineConfig) -> None:
    """Before `stage` trains: delete what was built on it (the later stages; the other methods, trained from SFT and
    the RM; the report). Deleted before, not after: a rerun after a kill in between would take them as finished."""
    later = list(TRAINING_STAGES[TRAINING_STAGES.index(stage) + 1 :])
    if stage in ("sft", "rm"):
        later += config.methods
    for name in later:
        remove_tree(run_dir / name)
    for name in ("report.json", "report.md"):
        (run_dir / name).unlink(missing_ok=True)


def _export(run_dir: Path) -> str:
    """merged/policy and merged/reward: LoRA adapters merged into their bases, full models copied."""
    from kochat_trl.models.export import merge_adapter
    from kochat_trl.models.loading import adapter_base

    merged = run_dir / "merged"
    exported = {}
    for name, stage in (("policy", "ppo"), ("reward", "rm")):
        source, target = run_dir / stage, merged / name
        if adapter_base(source) is not None:
            merge_adapter(source, target, overwrite=True)
        else:
            with atomic_output_dir(target, overwrite=True) as staging:  # a kill mid-copy leaves no partial model
                shutil.copytree(
                    source, staging, ignore=shutil.ignore_patterns("checkpoint-*", "*.png", "*.bin"), dirs_exist_ok=True
                )
        exported[name] = str(target)
    return f"{exported['policy']} and {exported['reward']} load with plain transformers"


def _decoding(run_dir: Path, config: PipelineConfig) -> str:
    from kochat_trl.eval.decoding import compare_decoding, default_prompts, render_markdown

    result = compare_decoding(
        str(run_dir / "merged" / "policy"),
        default_prompts(config.decoding_prompts),
        config.decoding_strategies,
        reward_model=str(run_dir / "merged" / "reward"),
        seed=config.seed,
    )
    write_text_atomic(render_markdown(result), run_dir / "decoding.md")
    return f"{len(result.results)} strategies on {len(result.prompts)} prompts in {run_dir / 'decoding.md'}"


def _conversations(run_dir: Path, config: PipelineConfig) -> str:
    from kochat_trl.eval.conversations import RESULT_FILE, evaluate_conversations

    models = {"SFT": str(run_dir / "sft"), "PPO": str(run_dir / "merged" / "policy")}
    result = evaluate_conversations(models, seed=config.seed)
    write_json_atomic(result, run_dir / RESULT_FILE)
    sft, ppo = (result["models"][name]["rates"] for name in ("SFT", "PPO"))
    return (
        f"{len(result['questions'])} held-out conversations, the answer on its own question's topic at turn 2 "
        f"{sft['turn_2']['on_topic_rate']:.2f} -> {ppo['turn_2']['on_topic_rate']:.2f}, turn 3 "
        f"{sft['turn_3']['on_topic_rate']:.2f} -> {ppo['turn_3']['on_topic_rate']:.2f} (SFT -> PPO)"
    )


def run_pipeline(
    config_path: str | os.PathLike | None = None,
    output_dir: str | None = None,
    overwrite: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run (or continue) the pipeline; returns report.json's content."""
    config = PipelineConfig.load(config_path or DEFAULT_CONFIG)
    run_dir = Path(output_dir or config.output_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / STATE_FILE).is_file() and not overwrite:
        check_output_dir(run_dir, overwrite=False)  # not a pipeline folder: refuse to write into it
    if overwrite and run_dir.exists():
        check_output_dir(run_dir, overwrite=True)
        remove_tree(run_dir)
    with writing_to(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        return _continue_pipeline(config, run_dir, verbose)


def _continue_pipeline(config: PipelineConfig, run_dir: Path, verbose: bool) -> dict[str, Any]:
    for folder in (run_dir, run_dir / "merged", *(run_dir / stage for stage in (*TRAINING_STAGES, *config.methods))):
        remove_leftovers(folder)  # what a killed run left half-written: staging folders, temporary files
    state = read_json(run_dir / STATE_FILE) or {"wall_time_s": {}}
    write_json_atomic(state, run_dir / STATE_FILE)  # marks the folder as a pipeline run
    wall_time: dict[str, float] = state["wall_time_s"]

    base = Path(config.base_model) if config.base_model else run_dir / "base"
    if config.base_model is None and not (base / "kochat_tiny.json").is_file():
        from kochat_trl.models.tiny import ensure_tiny

        ensure_tiny(base, seed=config.seed)
        say(f"base: built the embedded tiny default in {base}")
    from kochat_trl.run.resume import last_complete_checkpoint  # imports torch: only when a run starts

    redo_after = False  # a redone stage invalidates everything built on it
    for stage in TRAINING_STAGES:
        if stage_finished(run_dir / stage) and not redo_after:
            say(f"{stage}: finished in {run_dir / stage}, skipped")
            continue
        # Resuming is only valid while everything the stage was built on is unchanged.
        checkpoint = None if redo_after else last_complete_checkpoint(run_dir / stage)
        if checkpoint is not None:
            say(f"{stage}: unfinished, resuming from {checkpoint}")
        _invalidate_after(stage, run_dir, config)
        started = time.perf_counter()
        run_stage(stage, config, run_dir, base, resume=checkpoint is not None, verbose=verbose)
        wall_time[stage] = round(time.perf_counter() - started, 2)
        redo_after = True
        write_json_atomic(state, run_dir / STATE_FILE)
    if config.methods:
        from kochat_trl.eval.methods import compare_methods

        started = time.perf_counter()
        compare_methods(run_dir, ["ppo", *config.methods], configs=Path(config.stages["ppo"]).parent, verbose=verbose)
        wall_time["methods"] = round(time.perf_counter() - started, 2)
    for step, action in (
        ("merge", lambda: _export(run_dir)),
        ("decoding", lambda: _decoding(run_dir, config)),
        ("conversations", lambda: _conversations(run_dir, config)),
    ):
        started = time.perf_counter()
        done = action()
        wall_time[step] = round(time.perf_counter() - started, 2)
        say(f"{step}: {done}")
    write_json_atomic(state, run_dir / STATE_FILE)

    from kochat_trl.eval.pipeline_report import build_report, render_report

    report = build_report(run_dir, wall_time)
    write_text_atomic(render_report(report), run_dir / "report.md")
    write_json_atomic(report, run_dir / "report.json")
    return report
