"""One training step's peak GPU memory: a stage's components summed as static + largest transient phase.

Peak = everything held for the whole step + the largest transient phase (PPO: training, generation, scoring),
plus a fixed 1 GiB for the CUDA context, cuBLAS workspaces and allocator slack (not seen by
`torch.cuda.max_memory_allocated`; compare that with `Estimate.tensor_bytes`). Which components each stage
holds is in `kochat_trl.fitcheck.components`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from kochat_trl.errors import KochatError
from kochat_trl.fitcheck.components import (
    Component,
    checkpoint_note,
    dpo_components,
    ppo_components,
    trainer_components,
)
from kochat_trl.fitcheck.memory import activation_bytes, logits_bytes, trainable_params
from kochat_trl.fitcheck.settings import DTYPE_BYTES, GIB, FitSettings
from kochat_trl.fitcheck.shape import model_shape

if TYPE_CHECKING:
    from transformers import PretrainedConfig

CUDA_OVERHEAD_BYTES = GIB
STAGES = ("sft", "rm", "ppo", "dpo")


@dataclass
class Estimate:
    """Peak GPU memory of one training step; `tensor_bytes` is comparable with torch's max_memory_allocated."""

    model: str
    stage: str
    settings: FitSettings
    param_count: int
    trainable_params: int
    components: list[Component]
    tensor_bytes: int
    overhead_bytes: int
    total_bytes: int
    notes: list[str] = field(default_factory=list)

    def bytes_of(self, key: str) -> int:
        return sum(component.bytes for component in self.components if component.key == key)

    def phase_bytes(self) -> dict[str, int]:
        return _phase_totals(self.components)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "stage": self.stage,
            "settings": asdict(self.settings),
            "param_count": self.param_count,
            "trainable_params": self.trainable_params,
            "components": {c.key: {"bytes": c.bytes, "phase": c.phase, "formula": c.formula} for c in self.components},
            "phase_bytes": self.phase_bytes(),
            "tensor_bytes": self.tensor_bytes,
            "overhead_bytes": self.overhead_bytes,
            "total_bytes": self.total_bytes,
            "notes": list(self.notes),
        }


def estimate(
    model_config: PretrainedConfig, stage: str, settings: FitSettings, model_name: str | None = None
) -> Estimate:
    """Peak GPU memory of one `stage` ("sft", "rm", "ppo", "dpo") training step of `model_config` under `settings`."""
    if stage not in STAGES:
        raise KochatError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    settings.validate()
    name = model_name or getattr(model_config, "name_or_path", "") or model_config.model_type
    clm = model_shape(model_config, "clm")
    length = settings.seq_len + (settings.response_length if stage == "ppo" else 0)
    if clm.max_positions and length > clm.max_positions:
        what = "--seq-len + --response-length" if stage == "ppo" else "--seq-len"
        raise KochatError(f"{what} = {length} exceeds {name}'s {clm.max_positions} positions; lower it")
    e = DTYPE_BYTES[settings.dtype]
    batch = settings.batch_size
    notes: list[str] = []
    if stage == "sft":
        tokens = batch * settings.seq_len
        components = trainer_components(clm, settings, "", "model") + [
            Component(
                "activations",
                "activations",
                activation_bytes(clm, settings, tokens, dropout=True),
                "train",
                f"{batch} x {settings.seq_len} tokens" + checkpoint_note(settings),
            ),
            Component(
                "logits",
                "logits + loss",
                logits_bytes(clm, settings, tokens),
                "train",
                f"{tokens:,} tokens x vocab {clm.vocab:,} x ({e}+8) B",
            ),
        ]
        trainable = trainable_params(clm, settings)[0]
    elif stage == "rm":
        cls = model_shape(model_config, "cls")
        tokens = 2 * batch * settings.seq_len  # chosen and rejected in one forward
        components = trainer_components(cls, settings, "", "reward model") + [
            Component(
                "activations",
                "activations",
                activation_bytes(cls, settings, tokens, dropout=True),
                "train",
                f"2 x {batch} x {settings.seq_len} tokens (chosen + rejected)" + checkpoint_note(settings),
            ),
        ]
        clm = cls
        trainable = trainable_params(cls, settings)[0]
    elif stage == "dpo":
        components = dpo_components(clm, settings)
        trainable = trainable_params(clm, settings)[0]
        reference = "the policy with its adapter disabled (no extra weights)" if settings.lora else "a full copy"
        notes.append(f"reference: {reference}; chosen and rejected answers go through one forward (2 x batch)")
    else:
        components, trainable = ppo_components(model_config, clm, settings)
        value = "with its own LoRA adapter and score head" if settings.lora else "fully trained"
        reference = "the policy with its adapter disabled (no extra weights)" if settings.lora else "a full copy"
        if settings.shared_base:
            notes.append(
                "shared base: one frozen base for policy, reference, reward and value (their adapters on it), "
                "as the PPO recipe trains with shared_base: true"
            )
        else:
            notes.append(f"value model: a separate copy of the reward model, {value}")
        notes.append(f"reference: {reference}")
    if settings.dtype == "fp16" and not settings.lora:
        notes.append("fp16 full fine-tuning: the Trainer's AMP refuses fp16 weights; load fp32 and train with --fp16")
    static = sum(c.bytes for c in components if c.phase == "static")
    transient = max((total for phase, total in _phase_totals(components).items() if phase != "static"), default=0)
    tensor_bytes = static + transient
    return Estimate(
        model=name,
        stage=stage,
        settings=settings,
        param_count=clm.param_count,
        trainable_params=trainable,
        components=components,
        tensor_bytes=tensor_bytes,
        overhead_bytes=CUDA_OVERHEAD_BYTES,
        total_bytes=tensor_bytes + CUDA_OVERHEAD_BYTES,
        notes=notes,
    )


def _phase_totals(components: list[Component]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for component in components:
        totals[component.phase] = totals.get(component.phase, 0) + component.bytes
    return totals
