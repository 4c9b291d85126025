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
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


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


# A stage folder is finished when its metrics file exists: the recipes write it last (kochat_trl.runs.finish_run).
METRICS_FILE = "metrics.json"


def stage_finished(output_dir: str | os.PathLike) -> bool:
    """Whether the stage that writes to `output_dir` finished (its metrics file is there)."""
    return (Path(output_dir) / METRICS_FILE).is_file()


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in `path`, or None when the file is not there."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
