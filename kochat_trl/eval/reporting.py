"""Metrics files and PNG training curves from a trainer's log history."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def series(log_history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged metric, in order."""
    points = [(entry.get("step", index), entry[key]) for index, entry in enumerate(log_history) if key in entry]
    points = [(step, float(value)) for step, value in points if isinstance(value, (int, float))]
    return [step for step, _ in points], [value for _, value in points]


def plot_curves(log_history: list[dict[str, Any]], keys: Sequence[str], path: str | Path) -> Path | None:
    """One panel per logged key that has values; returns the PNG path, or None if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")  # headless: training machines have no display
    import matplotlib.pyplot as plt

    present = [key for key in keys if series(log_history, key)[0]]
    if not present:
        return None
    columns = min(3, len(present))
    rows = math.ceil(len(present) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for axis, key in zip(axes.flat, present, strict=False):
        steps, values = series(log_history, key)
        axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(present) :]:
        axis.axis("off")
    return save_figure(figure, path)


def save_figure(figure: Any, path: str | Path) -> Path:
    """Lay out, write atomically (a temporary file, then a rename) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    temporary.replace(path)
    return path
