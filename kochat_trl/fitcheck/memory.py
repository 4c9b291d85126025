"""Bytes per memory component (weights, trainable state, activations, logits) for one model under settings.

Memory follows how the libraries this project uses store things:

- weights: `--dtype` bytes per parameter. With bitsandbytes, every Linear/Conv1D of the backbone is
  quantized and the heads (`lm_head`, `score`) are not: 8-bit = 1 byte per weight + one fp32 scale per output
  row (`SCB`); 4-bit nf4 = half a byte per weight + one fp32 absmax per block of 64 (the quant state; trl's
  default has no nested quantization). peft's `prepare_model_for_kbit_training`, which `kochat_trl.models.loading`
  always runs on k-bit models, upcasts every remaining fp16/bf16 parameter (embeddings, norms, biases, heads)
  to fp32, so those count 4 bytes.
- LoRA (`kochat_trl.models.lora.lora_target_modules`): r*(in+out) parameters per targeted layer, kept in fp32 by
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
"""

from __future__ import annotations

import math

from kochat_trl.fitcheck.settings import DTYPE_BYTES, FitSettings
from kochat_trl.fitcheck.shape import ModelShape

NF4_BLOCK_SIZE = 64  # bitsandbytes' default 4-bit block: one fp32 absmax per 64 weights
KBIT_UPCAST_BYTES = 4  # peft prepare_model_for_kbit_training: non-quantized params to fp32


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


def unquantized_bytes(settings: FitSettings) -> int:
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
    return lora + head_copy, 4 * lora + unquantized_bytes(settings) * head_copy


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
