"""Will a training stage fit on one GPU? A peak-memory estimate per component, from the model's real shapes.

Parameters are counted exactly: the model is built from its config on the `meta` device (no weights, no
download) and every module is inspected. Memory then follows how the libraries this project uses store things:

- weights: `--dtype` bytes per parameter. With bitsandbytes, every Linear/Conv1D of the backbone is
  quantized and the heads (`lm_head`, `score`) are not: 8-bit = 1 byte per weight + one fp32 scale per output
  row (`SCB`); 4-bit nf4 = half a byte per weight + one fp32 absmax per block of 64 (the quant state; trl's
  default has no nested quantization). peft's `prepare_model_for_kbit_training`, which `kochat_trl.modeling`
  always runs on k-bit models, upcasts every remaining fp16/bf16 parameter (embeddings, norms, biases, heads)
  to fp32, so those count 4 bytes.
- LoRA (`kochat_trl.modeling.lora_target_modules`): r*(in+out) parameters per targeted layer, kept in fp32 by
  peft (`autocast_adapter_dtype`): 4 (weight) + 4 (gradient) + 8 (AdamW exp_avg + exp_avg_sq) = 16 bytes each.
  A reward/value model also trains a copy of its `score` head (`modules_to_save`) in the weights' dtype.
- full fine-tuning: gradients and AdamW states have the parameter's dtype (torch's `zeros_like`): bf16 weights
  cost 2 + 2 + 4 = 8 bytes per parameter, fp32 weights 4 + 4 + 8 = 16.
- activations, per token per layer, e = `--dtype` bytes (the GPT-style count of Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models", 34·s·b·h, without its s² terms because
  SDPA/flash attention never stores the score matrix, refined for what PyTorch, transformers and peft keep):
      norms: n × h·e·u_norm            (u probed on the layer's real norm: 1 for LayerNorm; RMSNorm keeps an
                                        fp32 copy too; parallel-residual layers share one norm input)
      attention: (2h + 2·kv)·e         (SDPA keeps q, k, v and its output)
      MLP: I·e·u_act (+ 2·I·e gated)   (u probed on the real activation: 1 native, 4 for python `gelu_new`;
                                        a gated MLP's product keeps act(gate) and up)
      linear inputs: (3h + I)·e        (only for trained linears, full fine-tuning, or bitsandbytes 8-bit,
                                        which keeps its input regardless; 4-bit keeps none)
      dropout masks: 2h bytes          (when the config has residual dropout: GPT-2; none in PPO)
      LoRA, per target: in·(4 + 1) + r·4  (peft runs adapters in fp32: an fp32 input copy or dropout output,
                                        its 1-byte mask with lora_dropout, and lora_A's output)
  plus the final norm (and lm_head's input when it trains), and under k-bit one dequantized weight during
  backward. Without gradient checkpointing every layer keeps all of it; with it, each layer keeps only its
  input (h·e per token) and one layer is recomputed at a time. On CPU this matches the bytes autograd saves
  (summed with saved-tensor hooks) within -7%..+12% for Llama, GPT-2 and GPT-NeoX, full and LoRA, plain and
  checkpointed (fp32 LoRA without dropout overcounts up to +21%: q/k/v share one input there).
- logits: batch × seq × vocab × (e + 8): the logits, their fp32 upcast in the loss and the fp32 log-softmax
  kept for backward; for large Korean vocabularies this is often the single largest transient.
- a fixed 1 GiB for the CUDA context, cuBLAS workspaces and allocator slack (not seen by
  `torch.cuda.max_memory_allocated`; compare that with `Estimate.tensor_bytes`).

Stages: SFT trains a causal LM on batch × seq tokens. RM trains a sequence classifier on chosen and rejected
in one forward (2 × batch sequences). PPO (trl's PPOTrainer) holds the policy, the reference (the policy with
its adapter disabled under LoRA, else a full frozen copy), the reward model and the value model (a separate
copy of the reward model with its own LoRA adapter, or fully trained without LoRA); sequences are
seq_len (query) + response_length tokens and the rollout batch equals the training batch.
Peak = everything held for the whole step + the largest transient phase (PPO: training, generation, scoring).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kochat_trl.errors import KochatError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GIB = 1024**3
CUDA_OVERHEAD_BYTES = GIB
STAGES = ("sft", "rm", "ppo", "dpo")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
QUANTIZATIONS = (None, "8bit", "4bit")
NF4_BLOCK_SIZE = 64  # bitsandbytes' default 4-bit block: one fp32 absmax per 64 weights
KBIT_UPCAST_BYTES = 4  # peft prepare_model_for_kbit_training: non-quantized params to fp32

# Configs of the Korean checkpoints this project targets, as stored on the Hugging Face hub (memory-relevant
# fields only), so fit-check works offline. Sources: huggingface.co/<name>/config.json and the model cards.
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "skt/kogpt2-base-v2": {
        "model_type": "gpt2",
        "vocab_size": 51200,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_positions": 1024,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
    },
    "EleutherAI/polyglot-ko-1.3b": {
        "model_type": "gpt_neox",
        "vocab_size": 30080,
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 8192,
        "max_position_embeddings": 2048,
        "rotary_pct": 0.5,
        "tie_word_embeddings": False,
        "use_parallel_residual": True,
    },
    "EleutherAI/polyglot-ko-5.8b": {
        "model_type": "gpt_neox",
        "vocab_size": 30080,
        "hidden_size": 4096,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "intermediate_size": 16384,
        "max_position_embeddings": 2048,
        "rotary_pct": 0.25,
        "tie_word_embeddings": False,
        "use_parallel_residual": True,
    },
    "EleutherAI/polyglot-ko-12.8b": {
        "model_type": "gpt_neox",
        "vocab_size": 30080,
        "hidden_size": 5120,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "intermediate_size": 20480,
        "max_position_embeddings": 2048,
        "rotary_pct": 0.5,
        "tie_word_embeddings": False,
        "use_parallel_residual": True,
    },
}

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


@dataclass(frozen=True)
class LinearShape:
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read off a model built on the meta device."""

    model_type: str
    param_count: int  # unique parameters (tied embeddings once)
    quantizable: tuple[LinearShape, ...]  # backbone Linear/Conv1D weights bitsandbytes would quantize
    other_param_count: int  # embeddings, norms, biases, heads: never quantized
    head_param_count: int  # score head of a sequence classifier (trained as a copy under LoRA)
    lora_targets: tuple[LinearShape, ...]
    hidden: int
    layers: int
    kv_dim: int
    intermediate: int
    gated_mlp: bool
    vocab: int
    max_positions: int | None
    residual_dropout: bool
    norm_inputs: int  # norms per layer with their own input (parallel-residual layers share one)
    # Element-sized units autograd keeps per normalized / activated element, probed on the real modules
    # (RMSNorm keeps an fp32 copy; python-composed GELUs keep several tensors), indexed
    # [compute dtype is fp32][norm weights are trained].
    norm_saved: tuple[tuple[float, float], tuple[float, float]]
    act_saved: tuple[float, float]


@dataclass(frozen=True)
class Component:
    key: str
    label: str
    bytes: int
    phase: str  # "static": held the whole step; otherwise the transient phase it belongs to
    formula: str


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


def resolve_model_config(name_or_path: str) -> PretrainedConfig:
    """A preset name (case-insensitive), a local model folder, or a config.json path → a transformers config."""
    from transformers import AutoConfig

    presets = {name.lower(): name for name in PRESET_CONFIGS}
    if str(name_or_path).lower() in presets:
        name = presets[str(name_or_path).lower()]
        values = dict(PRESET_CONFIGS[name])
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        config.name_or_path = name
        return config
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise KochatError(
            f"{name_or_path}: not a local model folder or config.json, nor a known model "
            f"({', '.join(PRESET_CONFIGS)}); the hub is not used here"
        )
    from transformers import CONFIG_MAPPING

    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        model_type = values.pop("model_type", None) if isinstance(values, dict) else None
        if model_type not in CONFIG_MAPPING:
            raise KochatError(f"{path}: model_type {model_type!r} is unknown to transformers; check the config")
        config = AutoConfig.for_model(model_type, **values)
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise KochatError(f"{path}: cannot read it as a transformers model config ({error})") from None
    config.name_or_path = str(name_or_path)
    return config


def _meta_model(config: PretrainedConfig, head: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if head == "cls":
        config = copy.deepcopy(config)
        config.num_labels = 1  # a reward/value model scores with one logit
        auto_class = AutoModelForSequenceClassification
    else:
        auto_class = AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto_class.from_config(config)
    except ValueError as error:
        kind = "sequence classifier (reward/value model)" if head == "cls" else "causal LM"
        raise KochatError(f"model_type {config.model_type!r} has no transformers {kind} class ({error})") from None


def _first_number(config: PretrainedConfig, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool) and value:
            return int(value)
    return None


@functools.lru_cache(maxsize=16)
def _model_shape_cached(config_json: str, model_type: str, head: str) -> ModelShape:
    from torch import nn
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    from kochat_trl.modeling import _HEAD_MODULE_NAMES, lora_target_modules

    values = json.loads(config_json)
    values.pop("model_type", None)
    config = AutoConfig.for_model(model_type, **values)
    model = _meta_model(config, head)
    modules = dict(model.named_modules())
    targets = set(lora_target_modules(model))

    quantizable, lora_targets = [], []
    param_count = quantized_count = head_count = 0
    for name, parameter in model.named_parameters():  # tied parameters appear once
        param_count += parameter.numel()
        module_name, _, param_name = name.rpartition(".")
        module = modules[module_name]
        leaf = module_name.rsplit(".", 1)[-1]
        if leaf in ("score", "classifier"):
            head_count += parameter.numel()
        if param_name != "weight" or not isinstance(module, nn.Linear | Conv1D) or leaf in _HEAD_MODULE_NAMES:
            continue
        if isinstance(module, Conv1D):  # GPT-2 stores (in, out)
            in_features, out_features = module.weight.shape
        else:
            out_features, in_features = module.weight.shape
        linear = LinearShape(module_name, int(in_features), int(out_features))
        quantizable.append(linear)
        quantized_count += parameter.numel()
        if leaf in targets:
            lora_targets.append(linear)

    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = _first_number(config, "head_dim") or hidden // heads
    kv_heads = _first_number(config, "num_key_value_heads") or heads
    gated = any(leaf in ("gate_proj", "gate_up_proj", "w3") for leaf in (n.rsplit(".", 1)[-1] for n in modules))
    dropout = any(
        float(getattr(config, name, 0) or 0) > 0
        for name in ("resid_pdrop", "hidden_dropout", "hidden_dropout_prob", "dropout")
    )
    norms, activation = _layer_norms_and_activation(model, config.num_hidden_layers)
    norm_inputs = max(1, len(norms) - (1 if getattr(config, "use_parallel_residual", False) else 0))
    return ModelShape(
        model_type=model_type,
        param_count=param_count,
        quantizable=tuple(quantizable),
        other_param_count=param_count - quantized_count,
        head_param_count=head_count,
        lora_targets=tuple(lora_targets),
        hidden=hidden,
        layers=config.num_hidden_layers,
        kv_dim=kv_heads * head_dim,
        intermediate=_first_number(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden,
        gated_mlp=gated,
        vocab=config.vocab_size,
        max_positions=_first_number(config, "max_position_embeddings", "n_positions"),
        residual_dropout=dropout,
        norm_inputs=norm_inputs if norms else 2,
        norm_saved=tuple(
            tuple(_probe_saved(norms[0] if norms else None, size, trained, 1.0) for trained in (False, True))
            for size in (2, 4)
        ),
        act_saved=tuple(_probe_saved(activation, size, False, 1.0) for size in (2, 4)),
    )


def _layer_norms_and_activation(model, layers: int) -> tuple[list, Any]:
    """The first decoder layer's norm modules and its MLP activation module (None when not found)."""
    from torch import nn
    from transformers.activations import ACT2CLS

    activation_classes = tuple(cls[0] if isinstance(cls, tuple) else cls for cls in ACT2CLS.values())
    first_layer = next(
        (module[0] for module in model.modules() if isinstance(module, nn.ModuleList) and len(module) == layers),
        None,
    )
    if first_layer is None:
        return [], None
    norms = [m for m in first_layer.modules() if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("Norm")]

    def width(norm) -> int:
        weight = getattr(norm, "weight", None)
        return weight.numel() if weight is not None else 0

    # q/k norms (per head) normalize less than a full hidden state: only full-width norms count here.
    widest = max((width(norm) for norm in norms), default=0)
    hidden_norms = [norm for norm in norms if width(norm) in (0, widest)]
    activation = next((m for m in first_layer.modules() if isinstance(m, activation_classes)), None)
    return hidden_norms, activation


def _probe_saved(module, element_bytes: int, trained: bool, fallback: float) -> float:
    """Bytes autograd keeps per input element when `module` runs on a small CPU tensor, divided by element bytes.

    Runs a copy of the real module (meta weights materialized on the CPU) and sums the distinct storages the
    saved-tensor hooks see, parameters excluded: exact for the module's own autograd graph.
    """
    import torch

    if module is None:
        return fallback
    dtype = torch.bfloat16 if element_bytes == 2 else torch.float32
    weight = getattr(module, "weight", None)
    width = weight.shape[-1] if weight is not None else 64  # activations have no weight: any width will do
    try:
        probe = copy.deepcopy(module).to_empty(device="cpu").to(dtype)
        for parameter in probe.parameters():
            torch.nn.init.ones_(parameter)
            parameter.requires_grad_(trained)  # a frozen weight spares the tensors only its gradient needs
        parameters = {parameter.untyped_storage().data_ptr() for parameter in probe.parameters()}
        saved: dict[int, int] = {}

        def keep(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        inputs = torch.randn(2, 8, width, dtype=dtype, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            probe(inputs)
        return sum(saved.values()) / (inputs.numel() * element_bytes)
    except (RuntimeError, TypeError, ValueError):  # an exotic module: assume it keeps its input
        return fallback


def model_shape(config: PretrainedConfig, head: str = "clm") -> ModelShape:
    """Exact parameter layout of `config` as a causal LM ("clm") or a one-logit sequence classifier ("cls")."""
    return _model_shape_cached(config.to_json_string(use_diff=False), config.model_type, head)


# --- per-component formulas -------------------------------------------------------------------------


def weight_bytes(shape: ModelShape, settings: FitSettings) -> int:
    """Bytes of all weights as loaded (quantized backbone linears + unquantized rest)."""
    quantized_numel = sum(linear.in_features * linear.out_features for linear in shape.quantizable)
    if settings.quantization is None:
        return shape.param_count * DTYPE_BYTES[settings.dtype]
    if settings.quantization == "8bit":  # int8 weights + fp32 row scales (SCB)
        quantized = quantized_numel + 4 * sum(linear.out_features for linear in shape.quantizable)
    else:  # nf4: two weights per byte + fp32 absmax per block
        quantized = sum(
            math.ceil(n / 2) + 4 * math.ceil(n / NF4_BLOCK_SIZE)
            for n in (linear.in_features * linear.out_features for linear in shape.quantizable)
        )
    return quantized + shape.other_param_count * KBIT_UPCAST_BYTES


def lora_param_count(shape: ModelShape, rank: int) -> int:
    return sum(rank * (linear.in_features + linear.out_features) for linear in shape.lora_targets)


def _unquantized_bytes(settings: FitSettings) -> int:
    return KBIT_UPCAST_BYTES if settings.quantization else DTYPE_BYTES[settings.dtype]


def trainable_params(shape: ModelShape, settings: FitSettings) -> tuple[int, int]:
    """(count, bytes) of the parameters that get gradients and AdamW states.

    LoRA: the adapter in fp32, plus a sequence classifier's score head copy (`modules_to_save`) in the dtype
    of the original head. Full fine-tuning: every parameter in `--dtype`.
    """
    if not settings.lora:
        return shape.param_count, shape.param_count * DTYPE_BYTES[settings.dtype]
    lora = lora_param_count(shape, settings.lora_r)
    head_copy = shape.head_param_count
    return lora + head_copy, 4 * lora + _unquantized_bytes(settings) * head_copy


def activation_bytes(shape: ModelShape, settings: FitSettings, tokens: int, dropout: bool) -> int:
    """Activations kept for backward over `tokens` (batch × sequence) tokens; formula in the module docstring."""
    e = DTYPE_BYTES[settings.dtype]
    probe = 0 if e == 2 else 1
    h, kv, inner = shape.hidden, shape.kv_dim, shape.intermediate
    norm = shape.norm_saved[probe][not settings.lora] * h * e
    per_layer = shape.norm_inputs * norm + (2 * h + 2 * kv) * e  # norms; SDPA keeps q, k, v and its output
    per_layer += shape.act_saved[probe] * inner * e + (2 * inner * e if shape.gated_mlp else 0)
    # A Linear keeps its input only to compute its weight's gradient; bitsandbytes 8-bit keeps it regardless.
    linears_keep_inputs = not settings.lora or settings.quantization == "8bit"
    if linears_keep_inputs:
        per_layer += (3 * h + inner) * e  # attention in, attention out, MLP in, down-projection in
    if dropout and shape.residual_dropout:
        per_layer += 2 * h  # 1-byte masks after attention and MLP
    lora = 0
    if settings.lora:
        # peft runs the adapter in fp32: each target keeps an fp32 copy of its input (the cast or the dropout
        # output; shared by q/k/v only for fp32 without dropout, counted per target anyway) and lora_A's output.
        mask = 1 if dropout and settings.lora_dropout > 0 else 0
        lora = sum(linear.in_features * (4 + mask) + settings.lora_r * 4 for linear in shape.lora_targets)
    final = norm + (h * e if not settings.lora else 0)  # final norm; lm_head input when lm_head trains
    if settings.gradient_checkpointing:  # layer inputs kept, one layer recomputed at a time
        kept = tokens * (shape.layers * h * e + per_layer + lora / max(shape.layers, 1) + final)
    else:
        kept = tokens * (shape.layers * per_layer + lora + final)
    if settings.quantization:  # backward dequantizes one k-bit weight at a time to multiply the gradient
        kept += max((linear.in_features * linear.out_features for linear in shape.quantizable), default=0) * e
    return math.ceil(kept)


def logits_bytes(shape: ModelShape, settings: FitSettings, tokens: int) -> int:
    """Logits in the compute dtype + fp32 upcast + fp32 log-softmax kept for backward."""
    return tokens * shape.vocab * (DTYPE_BYTES[settings.dtype] + 8)


def _weights_label(settings: FitSettings) -> str:
    if settings.quantization == "8bit":
        return "int8 + fp32 scales, rest fp32"
    if settings.quantization == "4bit":
        return "nf4 + fp32 absmax, rest fp32"
    return settings.dtype


def _trainer_components(shape: ModelShape, settings: FitSettings, prefix: str, label: str) -> list[Component]:
    """Weights, adapter, gradients and AdamW states: gradients and each AdamW state have the trainable
    parameter's dtype (torch's zeros_like), so they cost 1x and 2x the trainable bytes."""
    count, trainable = trainable_params(shape, settings)
    if settings.lora:
        adapter_formula = f"{lora_param_count(shape, settings.lora_r):,} LoRA params x 4 B" + (
            f" + score head copy {shape.head_param_count:,} params" if shape.head_param_count else ""
        )
        kind = f"{count:,} trainable (LoRA fp32)"
    else:
        adapter_formula, kind = "none (full fine-tuning)", f"{count:,} trainable x {DTYPE_BYTES[settings.dtype]} B"
    return [
        Component(
            f"{prefix}weights",
            f"{label} weights",
            weight_bytes(shape, settings),
            "static",
            f"{shape.param_count:,} params, {_weights_label(settings)}",
        ),
        Component(
            f"{prefix}adapter", f"{label} LoRA adapter", trainable if settings.lora else 0, "static", adapter_formula
        ),
        Component(f"{prefix}gradients", f"{label} gradients", trainable, "static", kind),
        Component(
            f"{prefix}optimizer",
            f"{label} AdamW states",
            2 * trainable,
            "static",
            "exp_avg + exp_avg_sq, 2 x gradient bytes",
        ),
    ]


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
        components = _trainer_components(clm, settings, "", "model") + [
            Component(
                "activations",
                "activations",
                activation_bytes(clm, settings, tokens, dropout=True),
                "train",
                f"{batch} x {settings.seq_len} tokens" + _checkpoint_note(settings),
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
        components = _trainer_components(cls, settings, "", "reward model") + [
            Component(
                "activations",
                "activations",
                activation_bytes(cls, settings, tokens, dropout=True),
                "train",
                f"2 x {batch} x {settings.seq_len} tokens (chosen + rejected)" + _checkpoint_note(settings),
            ),
        ]
        clm = cls
        trainable = trainable_params(cls, settings)[0]
    elif stage == "dpo":
        components = _dpo_components(clm, settings)
        trainable = trainable_params(clm, settings)[0]
        reference = "the policy with its adapter disabled (no extra weights)" if settings.lora else "a full copy"
        notes.append(f"reference: {reference}; chosen and rejected answers go through one forward (2 x batch)")
    else:
        components, trainable = _ppo_components(model_config, clm, settings)
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


def _checkpoint_note(settings: FitSettings) -> str:
    return ", checkpointed" if settings.gradient_checkpointing else ""


def _dpo_components(policy: ModelShape, settings: FitSettings) -> list[Component]:
    """DPO (and KTO/ORPO, which hold at most as much): the policy's training state, the reference (a copy unless
    LoRA), and chosen + rejected rows in one forward; the reference's no-grad forward comes first, on its own."""
    e = DTYPE_BYTES[settings.dtype]
    tokens = 2 * settings.batch_size * settings.seq_len
    reference = 0 if settings.lora else weight_bytes(policy, settings)
    return [
        *_trainer_components(policy, settings, "", "policy"),
        Component(
            "reference_weights",
            "reference weights",
            reference,
            "static",
            "adapter disabled on the policy" if settings.lora else "frozen copy of the policy",
        ),
        Component(
            "activations",
            "activations",
            activation_bytes(policy, settings, tokens, dropout=True),
            "train",
            f"2 x {settings.batch_size} x {settings.seq_len} tokens (chosen + rejected)" + _checkpoint_note(settings),
        ),
        Component(
            "logits",
            "logits + log-probs",
            logits_bytes(policy, settings, tokens),
            "train",
            f"{tokens:,} tokens x vocab {policy.vocab:,} x ({e}+8) B",
        ),
        Component(
            "reference_logits",
            "reference logits",
            tokens * policy.vocab * e,
            "reference: score",
            f"no-grad forward, {tokens:,} tokens x vocab {policy.vocab:,} x {e} B",
        ),
    ]


def _ppo_components(
    model_config: PretrainedConfig, policy: ModelShape, settings: FitSettings
) -> tuple[list[Component], int]:
    cls = model_shape(model_config, "cls")
    e = DTYPE_BYTES[settings.dtype]
    batch, query, response = settings.batch_size, settings.seq_len, settings.response_length
    tokens = batch * (query + response)
    policy_parts = _trainer_components(policy, settings, "policy_", "policy")
    value_parts = _trainer_components(cls, settings, "value_", "value model")
    reference = 0 if settings.lora else weight_bytes(policy, settings)
    reward = Component(
        "reward_weights",
        "reward model weights",
        weight_bytes(cls, settings),
        "static",
        f"{cls.param_count:,} params, {_weights_label(settings)}, frozen",
    )
    if settings.shared_base:  # one frozen base: the reward model is its RM adapter + score head, frozen
        reward_adapter = lora_param_count(cls, settings.lora_r)
        reward = Component(
            "reward_weights",
            "reward model (RM adapter + head)",
            4 * reward_adapter + _unquantized_bytes(settings) * cls.head_param_count,
            "static",
            f"{reward_adapter:,} LoRA params x 4 B + score head {cls.head_param_count:,} params, on the policy's base",
        )
        value_parts[0] = Component("value_weights", "value model weights", 0, "static", "the policy's base (shared)")
    static = [
        *policy_parts[:2],
        Component(
            "reference_weights",
            "reference weights",
            reference,
            "static",
            "adapter disabled on the policy" if settings.lora else "frozen copy of the policy",
        ),
        reward,
        *value_parts[:2],
        Component(
            "gradients",
            "gradients (policy + value)",
            policy_parts[2].bytes + value_parts[2].bytes,
            "static",
            "trainable params of both",
        ),
        Component(
            "optimizer",
            "AdamW states (policy + value)",
            policy_parts[3].bytes + value_parts[3].bytes,
            "static",
            "exp_avg + exp_avg_sq",
        ),
        Component(
            "rollout_scores",
            "generation scores kept",
            batch * response * policy.vocab * 4,
            "static",
            f"{batch} x {response} x vocab {policy.vocab:,} fp32 (trl keeps them through the update)",
        ),
    ]
    checkpointed = _checkpoint_note(settings)
    kv = 2 * policy.layers * batch * (query + response) * policy.kv_dim * e
    transient = [
        # PPO disables dropout in every model, LoRA's included.
        Component(
            "policy_activations",
            "policy activations",
            activation_bytes(policy, settings, tokens, False),
            "train",
            f"{batch} x ({query}+{response}) tokens" + checkpointed,
        ),
        Component(
            "value_activations",
            "value model activations",
            activation_bytes(cls, settings, tokens, False),
            "train",
            f"{batch} x ({query}+{response}) tokens" + checkpointed,
        ),
        Component(
            "logits",
            "policy logits + log-probs",
            tokens * policy.vocab * e + batch * response * policy.vocab * 8,
            "train",
            f"all {tokens:,} positions x ({e} B) + response log-softmax and its gradient (fp32)",
        ),
        Component(
            "kv_cache",
            "generation KV cache",
            kv,
            "rollout: generate",
            f"2 x {policy.layers} layers x {batch} x {query + response} x {policy.kv_dim} x {e} B",
        ),
        Component(
            "generation_scores",
            "generation scores (stacking)",
            batch * response * policy.vocab * 4,
            "rollout: generate",
            "per-step fp32 scores before torch.stack",
        ),
        Component(
            "scoring_logits",
            "reference/policy scoring logits",
            tokens * policy.vocab * e,
            "rollout: score",
            "no-grad forward over query + response",
        ),
    ]
    trainable = trainable_params(policy, settings)[0] + trainable_params(cls, settings)[0]
    return static + transient, trainable


# --- verdict --------------------------------------------------------------------------------------


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
