"""Reading a pipeline run folder (what `kochat-trl ui` shows): its models, report, curves, wall times and datasets.

A run folder is what `kochat-trl pipeline` writes (base/, sft/, rm/, ppo/, maybe method folders, report.json).
`open_run` refuses a folder that is not one (KochatError: one line, exit 2) and accepts a half-finished one: what
is missing is listed in `RunFolder.problems`, so the page can say so instead of failing. Nothing here imports
torch; the models are loaded later, by `kochat_trl.ui.models`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kochat_trl.errors import KochatError
from kochat_trl.eval.methods import METHODS
from kochat_trl.run.outputs import METRICS_FILE, read_json, stage_finished

PIPELINE_STAGES = ("sft", "rm", "ppo")
STATE_FILE = "pipeline_state.json"  # = kochat_trl.pipeline.STATE_FILE (not imported: pipeline pulls in more)
REPORT_FILE = "report.json"
# The layout each folder's training data is read in (the preference methods train on rankings, RL on prompts).
DATA_STAGE = {
    "sft": "sft",
    "rm": "rm",
    "ppo": "ppo",
    "rloo": "ppo",
    "grpo": "ppo",
    "dpo": "rm",
    "kto": "rm",
    "orpo": "rm",
}


@dataclass(frozen=True)
class RunModel:
    """A policy of the run that can answer: `Generator.load(model_path, adapter)` loads it."""

    name: str  # base, sft, ppo, rloo, grpo, dpo, kto, orpo
    folder: Path
    model_path: Path
    adapter: Path | None = None  # a LoRA folder applied to model_path

    def generate_arguments(self) -> list[str]:
        """The `kochat-trl generate` flags that load the same model."""
        return ["--model", str(self.model_path), *(["--adapter", str(self.adapter)] if self.adapter else [])]


@dataclass
class RunFolder:
    path: Path
    models: list[RunModel]
    report: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)  # what is missing, in words, for the page

    @property
    def reward_model(self) -> Path | None:
        """The stage-2 reward model (rm/) when it finished training."""
        return self.path / "rm" if stage_finished(self.path / "rm") else None

    @property
    def finished(self) -> bool:
        return not self.problems

    def model(self, name: str) -> RunModel:
        for entry in self.models:
            if entry.name == name:
                return entry
        raise KochatError(f"{self.path}: no model {name!r}; this run has {', '.join(self.model_names()) or 'none'}")

    def model_names(self) -> list[str]:
        return [entry.name for entry in self.models]

    def curves(self) -> list[tuple[Path, str]]:
        """(PNG, caption) of every stage's training curves, then the methods' reward-KL plot."""
        folders = [*PIPELINE_STAGES, *(name for name in METHODS if name != "ppo")]
        pictures = [(self.path / name / "curves.png", f"{name} training curves") for name in folders]
        pictures.append((self.path / "methods" / "methods.png", "methods: RM reward against KL to SFT"))
        return [(path, caption) for path, caption in pictures if path.is_file()]

    def wall_times(self) -> dict[str, float]:
        """Seconds per step (sft, rm, ppo, merge, decoding, methods): report.json's, else the pipeline state's."""
        source = (self.report or {}).get("wall_time_s") or (self.state or {}).get("wall_time_s") or {}
        return {str(name): float(seconds) for name, seconds in source.items()}

    def stage_config(self, name: str) -> dict[str, Any]:
        """The settings a stage folder trained with (its config.yaml), or {} when there is none."""
        import yaml

        path = self.path / name / "config.yaml"
        if not path.is_file():
            return {}
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def _policy(run_dir: Path, name: str) -> tuple[RunModel | None, str | None]:
    """The loadable policy in RUN/name, or why it cannot be loaded."""
    folder = run_dir / name
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        return RunModel(name, folder, folder), None
    recorded = json.loads(config_file.read_text(encoding="utf-8"))["base_model_name_or_path"]
    base = Path(recorded)
    if _is_model_folder(base) or (not base.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", recorded)):
        return RunModel(name, folder, base, folder), None  # a local folder, or a hub id
    if name != "sft" and (run_dir / "sft" / "config.json").is_file():  # the run moved since: trained on RUN/sft
        return RunModel(name, folder, run_dir / "sft", folder), None
    return None, f"{name}/: a LoRA adapter whose base model is missing ({recorded})"


def open_run(path: str | os.PathLike) -> RunFolder:
    """Read a run folder; KochatError when `path` is not one. A half-finished run lists what it lacks in `problems`."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise KochatError(f"{run_dir}: no such folder; make a run with `kochat-trl pipeline --output_dir {run_dir}`")
    marks = [run_dir / STATE_FILE, run_dir / REPORT_FILE]
    if not any(mark.is_file() for mark in marks) and not any(_is_model_folder(run_dir / n) for n in ("base", "sft")):
        raise KochatError(
            f"{run_dir}: not a kochat-trl run folder (no {STATE_FILE}, {REPORT_FILE}, base/ or sft/); "
            f"make one with `kochat-trl pipeline --output_dir {run_dir}`"
        )
    problems, models = [], []
    if _is_model_folder(run_dir / "base"):  # absent when the pipeline config names a base_model
        models.append(RunModel("base", run_dir / "base", run_dir / "base"))
    for name in ("sft", "rm", *METHODS):
        if not stage_finished(run_dir / name):
            if name in PIPELINE_STAGES or (run_dir / name).is_dir():
                unscored = ": answers get no reward-model score" if name == "rm" else ""
                problems.append(f"{name}/: not finished (no {METRICS_FILE}){unscored}")
        elif name != "rm":
            entry, problem = _policy(run_dir, name)
            models += [entry] if entry else []
            problems += [problem] if problem else []
    report = read_json(run_dir / REPORT_FILE)
    if report is None:
        problems.append(f"{REPORT_FILE}: not written yet (the pipeline has not finished)")
    return RunFolder(run_dir, models, report, read_json(run_dir / STATE_FILE), problems)


@dataclass
class StageData:
    """The first rows of one stage's training data as the recipe read it, with the read/kept/dropped counts."""

    stage: str  # the run folder (sft, rm, ppo, dpo, ...)
    source: str  # dataset_name in the folder's config.yaml
    layout: str
    read: int
    candidates: int
    kept: int
    dropped: dict[str, int]
    rows: list[dict[str, Any]]
    summary: str  # the line the recipe printed: "layout rm: read 600 records, ..."
    error: str | None = None  # the data could not be read (a file moved): the page says why


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def stage_datasets(run: RunFolder, limit: int = 5) -> list[StageData]:
    """Per stage folder with a config.yaml: its data source read in the stage's layout, the first `limit` rows."""
    from kochat_trl.data.layouts import load_stage_data

    datasets = []
    for name, stage in DATA_STAGE.items():
        source = run.stage_config(name).get("dataset_name")
        if not source:
            continue
        try:
            loaded = load_stage_data(source, stage)
        except KochatError as error:
            datasets.append(StageData(name, str(source), "?", 0, 0, 0, {}, [], "", error=str(error)))
            continue
        rows = [{key: _cell(value) for key, value in row.items()} for row in loaded.rows[:limit]]
        datasets.append(
            StageData(
                name,
                str(source),
                loaded.layout,
                loaded.read,
                loaded.candidates,
                loaded.kept,
                dict(loaded.dropped),
                rows,
                loaded.summary(),
            )
        )
    return datasets


def held_out_prompts(run: RunFolder, count: int | None = None) -> list[str]:
    """The prompts PPO held out (its config's data source, eval split and seed), else the bundled default split;
    first the ones the report shows (answers PPO changed on topics SFT saw)."""
    prompts = _held_out_prompts(run)
    shown = [sample["prompt"] for sample in ((run.report or {}).get("ppo") or {}).get("samples") or []]
    prompts = [*dict.fromkeys([*(prompt for prompt in shown if prompt in prompts), *prompts])]
    return prompts[:count] if count else prompts


def _held_out_prompts(run: RunFolder) -> list[str]:
    from kochat_trl.data.layouts import load_stage_data, to_dataset_dict
    from kochat_trl.eval.decoding import HELD_OUT_FRACTION, HELD_OUT_SEED, default_prompts

    config = run.stage_config("ppo")
    if not config.get("dataset_name"):
        return default_prompts(60)
    try:
        rows = load_stage_data(config["dataset_name"], "ppo").rows
        split = to_dataset_dict(rows, config.get("eval_fraction", HELD_OUT_FRACTION), config.get("seed", HELD_OUT_SEED))
    except KochatError:  # the data moved since training: the bundled split still gives prompts to pick from
        return default_prompts(60)
    return list(split["eval" if "eval" in split else "train"]["prompt"])
