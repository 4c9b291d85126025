"""A model's exact parameter layout and layer shapes, read off the model built on the `meta` device.

Parameters are counted exactly: the model is built from its config on the `meta` device (no weights, no
download) and every module is inspected. What autograd keeps per norm and activation element is probed by
running a CPU copy of the first layer's real modules.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kochat_trl.errors import KochatError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


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

    from kochat_trl.models.lora import _HEAD_MODULE_NAMES, lora_target_modules

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
