"""Which distributed engine a run is under (DDP, DeepSpeed ZeRO-2/3, FSDP2), and what the RL stages do there.

The online RL stages must gather ZeRO-3 shards before a module generates or is saved.

The Trainer-based stages (SFT, RM, DPO, RLOO, GRPO) need none of this: transformers' Trainer gathers
for them. PPO (TRL 1.12's PPOTrainer) and our own held-out evaluation run models outside any engine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def requested_engine() -> str | None:
    """The engine `accelerate launch` was asked for by its config file (its environment), if any."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DEEPSPEED"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    return None


def parameter_sharding(training_args: Any, engine: str | None) -> str | None:
    """How the run shards parameters across processes ("FSDP" or "DeepSpeed ZeRO-3"), or None: from the launcher's
    `engine` (`requested_engine()`), a `--fsdp` setting, or a DeepSpeed config transformers already read."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if engine == "FSDP" or getattr(training_args, "fsdp", None):
        return "FSDP"
    zero3_launch = engine == "DEEPSPEED" and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    return "DeepSpeed ZeRO-3" if zero3_launch or is_deepspeed_zero3_enabled() else None


# accelerate 1.15 reads ACCELERATE_USE_FSDP only for GPU-like process groups (AcceleratorState): CPU processes stay
# MULTI_CPU and train as plain DDP, and fsdp_cpu_ram_efficient_loading leaves every rank but 0 with meta weights
# (a new reward head then fails: "Cannot copy out of meta tensor").
FSDP_NEEDS_GPUS = (
    "fsdp.yaml needs GPUs: on CPU accelerate runs it as plain DDP (nothing sharded, weights loaded on "
    "rank 0 only); launch with accelerate_configs/cpu_multiprocess.yaml, or deepspeed_zero3.yaml to "
    "shard on CPU"
)


def zero_stage(accelerator: Any) -> int | None:
    """The DeepSpeed ZeRO stage the accelerator runs under, or None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def is_partitioned(parameter: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter: each rank holds only its shard (`ds_tensor`) and `data` is empty."""
    return hasattr(parameter, "ds_id")


def partitioned(module: Any) -> bool:
    return any(is_partitioned(parameter) for parameter in module.parameters())


@contextmanager
def gathered(module: Any) -> Iterator[None]:
    """Every ZeRO-3 shard of `module` gathered on every rank for the duration (a collective: all ranks
    enter it together); nothing to do for replicated weights. Needed wherever a module runs outside the
    DeepSpeed engine that partitioned it: sampling answers, scoring them, saving it."""
    if not partitioned(module):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def full_state_dict(module: Any) -> dict[str, torch.Tensor]:
    """The module's whole state dict on CPU, its ZeRO-3 shards gathered (call on every rank)."""
    with gathered(module):
        return {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}


def save_pretrained(module: Any, folder: str | os.PathLike, is_main_process: bool) -> None:
    """`module.save_pretrained(folder)` with its ZeRO-3 shards gathered: every rank gathers, one writes."""
    state_dict = full_state_dict(module)
    if is_main_process:
        module.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)


def shard_numels(module: Any) -> dict[str, int]:
    """What this rank holds of `module`: the elements of its local parameter storage and of the full
    parameters (equal when replicated; about full / world_size each when ZeRO-3 or FSDP shard them)."""
    local = full = 0
    for parameter in module.parameters():
        if is_partitioned(parameter):
            local += parameter.ds_tensor.numel()
            full += parameter.ds_numel
        elif hasattr(parameter, "to_local"):  # FSDP2's DTensor
            local += parameter.to_local().numel()
            full += parameter.numel()
        else:
            local += parameter.numel()
            full += parameter.numel()
    return {"local": local, "full": full}


def optimizer_state_numel(optimizer: Any) -> int:
    """Elements of optimizer state this rank holds (Adam's moments): ZeRO-2/3 keep a 1/world_size share."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> DeepSpeed's -> torch's
    inner = getattr(inner, "optimizer", inner)
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += value.to_local().numel() if hasattr(value, "to_local") else value.numel()
    return total


def describe(accelerator: Any, model: Any, optimizer: Any = None) -> dict[str, Any]:
    """Facts about the engine that ran, read inside the process (for tests and the scaling doc)."""
    facts: dict[str, Any] = {
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "num_processes": accelerator.num_processes,
        "zero_stage": zero_stage(accelerator),
        "params": shard_numels(model),
    }
    if optimizer is not None:
        facts["optimizer_state_numel"] = optimizer_state_numel(optimizer)
    return facts


class DeepSpeedPPOFixes:
    """Mixed into TRL 1.12's PPOTrainer (kochat_trl.rl): where it breaks, or trains differently, under DeepSpeed."""

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        # Called by PPOTrainer.__init__ after it made its Accelerator, before it prepares the engine. TRL's PPO loop
        # never clips gradients (max_grad_norm is not read), but accelerate fills DeepSpeed's "auto" clipping with
        # 1.0: ZeRO runs clipped and drifted from DDP from the first update. Clip as the DDP loop does: not at all.
        # A number set in the DeepSpeed config (not "auto") is the user's and stays.
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.deepspeed_config.get("gradient_clipping", "auto") == "auto":
            plugin.deepspeed_config["gradient_clipping"] = 0.0
        super().create_optimizer_and_scheduler(num_training_steps)

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        # Trainer makes a weight-decay and a no-decay group; with LoRA the no-decay one is empty. DeepSpeed
        # drops empty groups when PPOTrainer prepares the optimizer, after the scheduler was built on both,
        # so the first scheduler step fails (zip() argument 2 is longer). Dropping them here keeps them equal.
        optimizer = super().create_optimizer(model)
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        return optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call)
        # TRL hands the bare policy to Trainer.save_model in place of the DeepSpeed engine, which then
        # reads `engine.config` from the model's config and fails. The policy alone, gathered, is saved.
        output_dir = output_dir or self.args.output_dir
        policy = self.accelerator.unwrap_model(self.model).policy
        save_pretrained(policy, output_dir, self.args.should_save)
        if self.args.should_save:
            self.processing_class.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()
