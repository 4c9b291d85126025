"""When a stage does not fit: the first knob (or stack of knobs) that makes it fit, as CLI flags."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from kochat_trl.fitcheck.estimate import Estimate, estimate
from kochat_trl.fitcheck.settings import FitSettings

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Suggestion:
    """Settings that make the stage fit, the CLI flags that get there, and their estimate."""

    flags: tuple[str, ...]
    settings: FitSettings
    estimate: Estimate


def changed_flags(before: FitSettings, after: FitSettings) -> tuple[str, ...]:
    flags = []
    if after.gradient_checkpointing and not before.gradient_checkpointing:
        flags.append("--gradient-checkpointing")
    if after.lora and not before.lora:
        flags.append("--lora")
    if after.quantization != before.quantization and after.quantization:
        flags.append(f"--load-in-{after.quantization}")
    if after.batch_size != before.batch_size:
        flags.append(f"--batch-size {after.batch_size}")
    if after.seq_len != before.seq_len:
        flags.append(f"--seq-len {after.seq_len}")
    return tuple(flags)


_QUANT_RANK = {None: 0, "8bit": 1, "4bit": 2}
# Whole-model changes tried one at a time, least disruptive first; then stacked in the same order.
_MODEL_KNOBS = (
    {"gradient_checkpointing": True},
    {"lora": True},
    {"lora": True, "quantization": "8bit"},
    {"lora": True, "quantization": "4bit"},
)


def _applied(settings: FitSettings, change: dict[str, Any]) -> FitSettings | None:
    """`settings` with `change`, or None when it changes nothing or would undo a stronger quantization."""
    candidate = replace(settings, **change)
    if candidate == settings or _QUANT_RANK[candidate.quantization] < _QUANT_RANK[settings.quantization]:
        return None
    return candidate


def _shorter_sequences(settings: FitSettings) -> list[FitSettings]:
    lengths, length = [], settings.seq_len // 2
    while length >= 32:
        lengths.append(length)
        length //= 2
    return [replace(settings, seq_len=length) for length in lengths]


def suggest(
    model_config: PretrainedConfig, stage: str, settings: FitSettings, gpu_bytes: int, model_name: str | None = None
) -> Suggestion | None:
    """The first knob (or, failing any single one, the first combination) whose re-estimate fits `gpu_bytes`.

    Order: gradient checkpointing, the largest smaller batch that fits, LoRA, 8-bit, 4-bit, a shorter sequence.
    """

    def fits(candidate: FitSettings) -> Suggestion | None:
        result = estimate(model_config, stage, candidate, model_name)
        if result.total_bytes <= gpu_bytes:
            return Suggestion(changed_flags(settings, candidate), candidate, result)
        return None

    def largest_batch(base: FitSettings) -> Suggestion | None:
        # Memory grows with the batch: bisect for the largest batch below base's that fits.
        low, high, best = 1, base.batch_size - 1, None
        while low <= high:
            middle = (low + high) // 2
            if found := fits(replace(base, batch_size=middle)):
                best, low = found, middle + 1
            else:
                high = middle - 1
        return best

    def first_fit(candidates: list[FitSettings]) -> Suggestion | None:
        return next((found for candidate in candidates if (found := fits(candidate))), None)

    checkpointing, *model_changes = (_applied(settings, change) for change in _MODEL_KNOBS)
    if checkpointing and (found := fits(checkpointing)):
        return found
    if found := largest_batch(settings) or first_fit([c for c in model_changes if c] + _shorter_sequences(settings)):
        return found
    # No single knob is enough: stack them in the same order, then shrink the batch and the sequence.
    stacked = settings
    for change in _MODEL_KNOBS:
        candidate = _applied(stacked, change)
        if candidate is None:
            continue
        stacked = candidate
        if found := fits(stacked):
            return found
    return largest_batch(stacked) or first_fit(_shorter_sequences(replace(stacked, batch_size=1)))
