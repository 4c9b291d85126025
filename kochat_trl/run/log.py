"""The `kochat_trl` logger: `[kochat-trl] ` lines, results to stdout and notes to stderr, main process only by default.

Like accelerate's `get_logger` (a `MultiProcessAdapter` whose calls take `main_process_only=True`), but the rank is
read from the launcher's environment: accelerate's adapter raises until `PartialState` exists, and the first lines
(data read, template installed) come before it. Handlers resolve sys.stdout/sys.stderr when they write, so a stream
swapped in later (the console's line filter, pytest's capture) gets the lines; the logger does not propagate, so the
libraries' verbosity settings never hide or duplicate them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

LOGGER_NAME = "kochat_trl"
PREFIX = "[kochat-trl] "


def is_main_process() -> bool:
    """Rank 0 of a launched run (or a plain process), from the launcher's environment."""
    return os.environ.get("RANK", "0") == "0"


class _CurrentStream(logging.StreamHandler):
    """Writes to the record's `stream`, else to what sys.stdout (INFO and below) or sys.stderr is right now."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        # Assigned, not setStream(): that flushes the previous stream, which may be closed by now (pytest's capture).
        self.stream = getattr(record, "stream", None) or (sys.stdout if record.levelno <= logging.INFO else sys.stderr)
        super().emit(record)


class MultiProcessAdapter(logging.LoggerAdapter):
    """`logger.info(message, main_process_only=False)` logs on every process; by default only rank 0 does."""

    def log(self, level: int, msg: Any, *args: Any, main_process_only: bool = True, **kwargs: Any) -> None:
        if not main_process_only or is_main_process():
            super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs.pop("main_process_only", None)
        return msg, kwargs

    def info(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.log(logging.INFO, msg, *args, **kwargs)

    def warning(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.log(logging.WARNING, msg, *args, **kwargs)


def get_logger(name: str = LOGGER_NAME) -> MultiProcessAdapter:
    """A logger under `kochat_trl` (one handler on the package's logger, installed once)."""
    root = logging.getLogger(LOGGER_NAME)
    if not root.handlers:
        handler = _CurrentStream()
        handler.setFormatter(logging.Formatter(PREFIX + "%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return MultiProcessAdapter(logging.getLogger(name), {})
