"""TRL 1.12's ORPO classes, which it keeps in trl.experimental (for `kochat_trl.rl.preference`)."""

from __future__ import annotations

from kochat_trl.run.console import known_warnings_ignored


def orpo_classes() -> tuple[type, type]:
    """(ORPOConfig, ORPOTrainer): TRL 1.12 keeps ORPO in trl.experimental, which only kochat_trl.rl imports."""
    with known_warnings_ignored():
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer
