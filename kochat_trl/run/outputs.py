"""Output folders: refuse to clobber, write atomically (temp folder + rename), tell a finished stage folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kochat_trl.errors import KochatError


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty output folder unless the user asked to overwrite it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KochatError(f"{path}: exists and is not a folder; choose another output path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise KochatError(f"{path}: output folder is not empty; pass --overwrite to replace it or pick another folder")
    return path


@contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path`, on failure it is removed.

    So an interrupted write never leaves a folder that looks finished.
    """
    final = check_output_dir(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary output folder
    try:
        yield staging
        if final.exists():
            # Moved aside, not deleted in place: a kill mid-delete would leave a partial folder under the final name.
            old = final.with_name(f".{final.name}.deleting-{os.getpid()}")
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder so that it is gone at once: renamed to a hidden sibling first, then deleted. A kill during
    `shutil.rmtree` in place leaves part of it, perhaps its metrics.json or a checkpoint's trainer_state.json,
    looking finished."""
    path = Path(path)
    if not path.exists():
        return
    for earlier in path.parent.glob(f".{path.name}.deleting-*"):  # what a killed remove_tree left
        shutil.rmtree(earlier, ignore_errors=True)
    trash = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# What a killed process leaves behind: atomic_output_dir's staging folders, write_text_atomic's temporary files,
# remove_tree's half-deleted folders. Hidden names, never read as results.
_LEFTOVER_MARKERS = (".tmp-", ".deleting-")


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete what an earlier, killed writer left in `folder` (not below it); the removed paths. Only for a folder
    no other process is writing to (a pipeline run folder being continued)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for child in folder.iterdir():
        if child.name.startswith(".") and any(marker in child.name for marker in _LEFTOVER_MARKERS):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 text to a temp file and rename it into place: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """JSON with Korean kept readable (ensure_ascii=False), written atomically."""
    return write_text_atomic(json.dumps(data, ensure_ascii=False, indent=2) + "\n", path)


# A stage folder is finished when its metrics file exists: the recipes write it last (recipes.steps.finish_run).
METRICS_FILE = "metrics.json"


def stage_finished(output_dir: str | os.PathLike) -> bool:
    """Whether the stage that writes to `output_dir` finished (its metrics file is there)."""
    return (Path(output_dir) / METRICS_FILE).is_file()


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in `path`, or None when the file is not there."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
