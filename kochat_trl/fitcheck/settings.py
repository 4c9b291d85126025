"""What fit-check is asked about: the training settings of a stage and the GPU's memory size."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kochat_trl.errors import KochatError

GIB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
QUANTIZATIONS = (None, "8bit", "4bit")

_MEMORY_POWERS = {"": 3, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_MEMORY_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|(b))?\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """Bytes in "24GB", "24GiB", "80G", "16000MB" or "24" (GiB). GB and GiB both mean 2**30: GPUs are sold so."""
    match = _MEMORY_PATTERN.match(str(text))
    if not match:
        raise KochatError(f"--gpu-memory {text!r}: expected a size like 24GB, 80GiB or 16000MB")
    prefix = (match.group(2) or match.group(3) or "").lower()
    size = int(float(match.group(1)) * 1024 ** _MEMORY_POWERS[prefix])
    if size <= 0:
        raise KochatError(f"--gpu-memory {text!r}: must be more than zero")
    return size


@dataclass(frozen=True)
class FitSettings:
    """How a stage would be trained; defaults follow trl's `ModelConfig` (r 16, lora_dropout 0.05)."""

    dtype: str = "bf16"
    quantization: str | None = None  # None, "8bit" or "4bit"
    lora: bool = True
    lora_r: int = 16
    lora_dropout: float = 0.05
    batch_size: int = 4
    seq_len: int = 512
    response_length: int = 128  # PPO only
    gradient_checkpointing: bool = False
    shared_base: bool = False  # PPO: reward and value models are adapters on the policy's frozen base

    def validate(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise KochatError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise KochatError(f"quantization must be 8bit, 4bit or none, got {self.quantization!r}")
        if self.shared_base and not self.lora:
            raise KochatError("--shared-base puts LoRA adapters on one base; drop --no-lora or --shared-base")
        if self.quantization and not self.lora:
            flag = f"--load-in-{self.quantization}"
            raise KochatError(f"{self.quantization} weights cannot be fully fine-tuned; drop --no-lora or {flag}")
        for name in ("lora_r", "batch_size", "seq_len", "response_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise KochatError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        if not 0 <= self.lora_dropout < 1:
            raise KochatError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
