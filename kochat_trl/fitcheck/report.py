"""The human-readable fit-check table: one row per component, the peak, the verdict and the knob to turn."""

from __future__ import annotations

from kochat_trl.fitcheck.estimate import Estimate
from kochat_trl.fitcheck.suggest import Suggestion


def _gib(size: int) -> str:
    return f"{size / 1024**3:.2f}"


def format_report(result: Estimate, gpu_bytes: int, suggestion: Suggestion | None = None) -> str:
    """The human-readable table: one row per component, the total, the verdict and the knob to turn."""
    settings = result.settings
    quantization = {"8bit": "8-bit", "4bit": "4-bit nf4", None: "no quantization"}[settings.quantization]
    training = f"LoRA r={settings.lora_r}" if settings.lora else "full fine-tuning"
    shape = f"batch {settings.batch_size} x seq {settings.seq_len}"
    if result.stage == "ppo":
        shape += f" + response {settings.response_length}"
    lines = [
        f"fit-check: {result.model}, stage {result.stage}, {result.param_count:,} parameters "
        f"({result.trainable_params:,} trainable)",
        f"settings: {settings.dtype}, {quantization}, {training}, {shape}, gradient checkpointing "
        + ("on" if settings.gradient_checkpointing else "off"),
        "",
        f"{'component':<34} {'phase':<18} {'GiB':>8}  how",
    ]
    for component in result.components:
        lines.append(f"{component.label:<34} {component.phase:<18} {_gib(component.bytes):>8}  {component.formula}")
    lines.append(f"{'CUDA context + allocator':<34} {'fixed':<18} {_gib(result.overhead_bytes):>8}  constant")
    phases = {phase: total for phase, total in result.phase_bytes().items() if phase != "static"}
    peak_phase = max(phases, key=phases.get) if phases else "static"
    lines.append(
        f"{'total (peak)':<34} {'':<18} {_gib(result.total_bytes):>8}  "
        f"static + largest transient phase ({peak_phase}) + overhead"
    )
    lines.append(f"{'GPU memory':<34} {'':<18} {_gib(gpu_bytes):>8}")
    lines.extend(f"note: {note}" for note in result.notes)
    lines.append("")
    spare = gpu_bytes - result.total_bytes
    if spare >= 0:
        lines.append(f"verdict: fits ({_gib(spare)} GiB to spare)")
    elif suggestion is None:
        lines.append(
            f"verdict: does not fit (short by {_gib(-spare)} GiB), even with 4-bit LoRA, batch 1, gradient "
            "checkpointing and a short sequence; use a bigger GPU or a smaller model"
        )
    else:
        lines.append(
            f"verdict: does not fit (short by {_gib(-spare)} GiB); use {' '.join(suggestion.flags)} "
            f"(estimated {_gib(suggestion.estimate.total_bytes)} GiB)"
        )
    return "\n".join(lines)
