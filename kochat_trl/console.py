"""What the user reads on the console besides errors: short notes, from the main process only."""

from __future__ import annotations

import os
import sys


def is_main_process() -> bool:
    """Rank 0 of a launched run (or a plain process); read from the launcher's environment, so it works
    before accelerate's state exists."""
    return os.environ.get("RANK", "0") == "0"


def note(message: str) -> None:
    """One line to stderr, in one write, from the main process only."""
    if is_main_process():
        sys.stderr.write(f"[kochat-trl] {message}\n")
        sys.stderr.flush()
