"""Kill -9 anywhere: `kochat-trl pipeline` SIGKILLed while it builds the base, trains, writes a checkpoint, between
stages, while a stage saves its final model, while it merges and while it writes the report; each rerun of the same
command continues (finished stages skipped, unfinished ones resumed from their newest complete checkpoint, never a
half-written one) and the last one ends with the numbers of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CHILD_ENV, REPO, pipeline_command, short_pipeline_config

from kochat_trl.run.resume import is_complete_checkpoint, last_complete_checkpoint

STAGES = ("sft", "rm", "ppo")


def killed_when(command: list[str], log: Path, ready: Callable[[], bool], what: str) -> None:
    """Start `command` (output to `log`) in its own process group and SIGKILL the group as soon as `ready()`."""
    with log.open("w") as output:
        child = subprocess.Popen(
            command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, env=CHILD_ENV, start_new_session=True
        )
    deadline = time.time() + 600
    while not _safely(ready):
        assert child.poll() is None, f"ended (exit {child.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"never reached {what}"
        time.sleep(0.001)
    os.killpg(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL


def _safely(ready: Callable[[], bool]) -> bool:
    try:
        return ready()
    except OSError:  # a folder renamed or removed while we looked
        return False


def hidden(folder: Path, marker: str) -> list[Path]:
    return [path for path in folder.glob(".*") if marker in path.name] if folder.is_dir() else []


def incomplete_checkpoint(stage_dir: Path, above: int) -> bool:
    """A checkpoint-N (N > above) the Trainer is writing: created, its trainer_state.json not yet written."""
    for path in stage_dir.glob("checkpoint-*"):
        if int(path.name.split("-")[1]) > above and not (path / "trainer_state.json").exists():
            return True
    return False


def state_file_started(stage_dir: Path, above: int) -> bool:
    """A checkpoint-N (N > above) whose trainer_state.json, the last file the Trainer writes, has been opened."""
    return any(
        int(path.parent.name.split("-")[1]) > above for path in stage_dir.glob("checkpoint-*/trainer_state.json")
    )


def logged_losses(stage_dir: Path) -> int:
    log = stage_dir / "train.log"
    return sum('"loss"' in line for line in log.read_text().splitlines()) if log.is_file() else 0


def assert_nothing_looks_finished_that_is_not(run_dir: Path) -> None:
    """Whatever a rerun would take as done is whole: a stage with metrics.json has its model and records, the newest
    complete checkpoint has everything a resume reads, report.json only after every stage and the merge."""
    for stage in STAGES:
        folder = run_dir / stage
        if (folder / "metrics.json").is_file():
            assert (folder / "config.yaml").is_file() and (folder / "log_history.json").is_file(), stage
            assert any((folder / name).is_file() for name in ("model.safetensors", "adapter_model.safetensors"))
        checkpoint = last_complete_checkpoint(folder)
        if checkpoint is not None:
            names = {path.name for path in checkpoint.iterdir()}
            assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= names, checkpoint
            assert names & {"model.safetensors", "adapter_model.safetensors"}, checkpoint
    if (run_dir / "report.json").exists():
        assert all((run_dir / stage / "metrics.json").is_file() for stage in STAGES)
        assert (run_dir / "merged" / "policy" / "config.json").is_file()


def comparable(run_dir: Path, name: str) -> object:
    """A result file of the run with its own folder's path made neutral (stage metrics record their model paths)."""
    text = (run_dir / name).read_text().replace(str(run_dir), "RUN")
    if not name.endswith(".json"):  # wall-clock numbers aside: report.md's wall-time table, decoding.md's tokens/s
        text = re.sub(r"## Wall time \(s\)\n.*?\n(?=## )", "", text, flags=re.S)
        return re.sub(r"^(\|(?:[^|]*\|){7}) [0-9.]+ \|", r"\1 - |", text, flags=re.M) if "tokens/s" in text else text
    data = json.loads(text)
    return {key: value for key, value in data.items() if key not in ("wall_time_s", "output_dir", "curve_seconds")}


RESULT_FILES = ("report.json", "report.md", "decoding.md", *(f"{stage}/metrics.json" for stage in STAGES))


@pytest.fixture(scope="module")
def uninterrupted(short_pipeline_run) -> Path:
    return short_pipeline_run


def resuming(run: Path, stage: str) -> str:
    """What the next run must print for an unfinished stage: the newest complete checkpoint, as found right after
    the kill (an incomplete newer one must be passed over)."""
    return f"{stage}: unfinished, resuming from {last_complete_checkpoint(run / stage)}"


@pytest.mark.slow
def test_pipeline_killed_anywhere_continues_to_the_uninterrupted_result(tmp_path, uninterrupted):
    """One run folder, SIGKILLed at nine points in turn (each rerun is the next run killed), then run to the end."""
    run = tmp_path / "run"
    command = pipeline_command(short_pipeline_config(tmp_path), run)
    skipped = [f"{stage}: finished in" for stage in STAGES]
    # (kill point, when to kill, what the next run must print: evaluated right after the kill)
    points: list[tuple[str, Callable[[], bool], Callable[[], list[str]]]] = [
        ("base being built", lambda: bool(hidden(run, ".base.tmp-")), lambda: ["base: built the embedded tiny"]),
        ("sft training", lambda: logged_losses(run / "sft") >= 3, lambda: [resuming(run, "sft")]),
        ("sft checkpoint being written", lambda: incomplete_checkpoint(run / "sft", 2), lambda: [resuming(run, "sft")]),
        (
            "sft trainer_state.json being written",
            lambda: state_file_started(run / "sft", 2),
            lambda: [resuming(run, "sft")],
        ),
        ("between sft and rm", lambda: (run / "sft" / "metrics.json").is_file(), lambda: skipped[:1]),
        (
            "rm saving its final model",
            lambda: (run / "rm" / "model.safetensors").is_file(),
            lambda: [resuming(run, "rm")],
        ),
        (
            "ppo training",
            lambda: is_complete_checkpoint(run / "ppo" / "checkpoint-1"),
            lambda: [*skipped[:2], resuming(run, "ppo")],
        ),
        ("merge", lambda: bool(hidden(run / "merged", ".tmp-")), lambda: [*skipped, "merge: "]),
        ("report being written", lambda: (run / "decoding.md").is_file(), lambda: [*skipped, "report: "]),
    ]
    expected, states = [], []
    for index, (point, ready, expect) in enumerate(points):
        killed_when(command, tmp_path / f"run-{index}.log", ready, point)
        assert_nothing_looks_finished_that_is_not(run)
        expected.append(expect())
        states.append(sorted(str(path.relative_to(run)) for path in run.rglob("*") if path.name.startswith(".")))
        if point == "sft checkpoint being written":
            half = [path.name for path in (run / "sft").glob("checkpoint-*") if not is_complete_checkpoint(path)]
            assert half, "the kill missed the checkpoint write"  # else this point tested nothing new
        if point == "sft trainer_state.json being written":  # half written, or whole: either way not mistaken
            half = [
                path.parent.name
                for path in (run / "sft").glob("checkpoint-*/trainer_state.json")
                if not is_complete_checkpoint(path.parent)
            ]
            print(f"trainer_state.json half written at the kill: {half}")
        if point == "between sft and rm":
            sft_finished = (run / "sft" / "metrics.json").stat().st_mtime_ns
    final = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=CHILD_ENV, timeout=900)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    reruns = [(tmp_path / f"run-{index}.log").read_text() for index in range(1, len(points))]
    reruns.append(final.stdout + final.stderr)

    for (point, _, _), lines, leftover, output in zip(points, expected, states, reruns, strict=True):
        did = [line.split("] ", 1)[-1] for line in output.splitlines() if "finished in" in line or "resuming" in line]
        print(f"killed at {point}: left {leftover}; the rerun: {did}")
        for line in lines:
            assert line in output, f"{point}: {line!r} not in\n{output[-3000:]}"
    assert (run / "sft" / "metrics.json").stat().st_mtime_ns == sft_finished  # never trained again

    # Every step trained once; nothing a killed run left behind is still there; the uninterrupted run's results.
    for stage, steps in (("sft", 8), ("rm", 6), ("ppo", 2)):
        history = json.loads((run / stage / "log_history.json").read_text())
        key = "objective/scores" if stage == "ppo" else "loss"
        assert [entry["step"] for entry in history if key in entry] == list(range(1, steps + 1)), stage
    assert [path for path in run.rglob(".*") if ".tmp-" in path.name or ".deleting-" in path.name] == []
    for name in RESULT_FILES:
        assert comparable(run, name) == comparable(uninterrupted, name), name
