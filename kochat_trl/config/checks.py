"""The checks every recipe runs before it loads a model: one rule per `_verify_*` function, one-line errors.

Numeric ranges were checked on the user's values before parsing (`kochat_trl.config.ranges`); what is left needs the
parsed dataclasses, the filesystem, a model's config.json or the data. `kochat_trl.config.plan` runs these groups in
order and adds the RL stages' rules (`kochat_trl.config.rl_checks`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from kochat_trl.config.arguments import KochatArguments
from kochat_trl.errors import ConfigError, DataError
from kochat_trl.run.outputs import METRICS_FILE, stage_finished


def check_settings(kochat_args: KochatArguments, training_args: Any, model_args: Any, sharding: str | None) -> None:
    """The settings on their own and against the launch (`sharding`: the engine's parameter sharding, or None)."""
    _verify_template(kochat_args)
    _verify_one_quantization(model_args)
    _verify_not_overwrite_and_resume(kochat_args, training_args)
    _verify_sharding_without_quantization(sharding, model_args)
    _verify_processes_joined(training_args)
    _verify_fsdp_has_gpus(training_args, sharding)
    _verify_model_named(model_args)


def check_output_dir(kochat_args: KochatArguments, training_args: Any) -> str | None:
    """output_dir can be written, and is empty unless resumed or overwritten; returns the checkpoint to resume from
    (resume_from_checkpoint resolved: a path, or the newest complete checkpoint for true/last), or None."""
    from kochat_trl.run.resume import resume_checkpoint

    # Every process checks (same filesystem), so a refusal never leaves the others waiting at a barrier.
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"{output_dir}: output_dir exists and is not a folder; choose another output_dir")
    checkpoint = resume_checkpoint(training_args)
    if checkpoint is not None and stage_finished(output_dir):
        raise ConfigError(
            f"{output_dir}: the stage already finished ({METRICS_FILE} exists); nothing to resume. "
            "Pass --overwrite true instead of --resume_from_checkpoint to train it again"
        )
    if output_dir.is_dir() and any(output_dir.iterdir()) and checkpoint is None and not kochat_args.overwrite:
        raise ConfigError(
            f"{output_dir}: output_dir is not empty; pass --overwrite true to replace it, "
            "or --resume_from_checkpoint last to continue"
        )
    existing = next(parent for parent in (output_dir, *output_dir.absolute().parents) if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{output_dir}: cannot write under {existing}; choose a writable output_dir")
    return checkpoint


def check_model(kochat_args: KochatArguments, training_args: Any, model_args: Any) -> int | None:
    """The model path and what trains on it fit the settings; returns the model's context length (None: unknown)."""
    check_model_path("model_name_or_path", model_args.model_name_or_path, kochat_args.init_tiny)
    _verify_lora_trains_on_a_full_model(model_args)
    context = model_context_length(model_args.model_name_or_path)
    _verify_max_length_fits(training_args, model_args, context)
    return context


def check_data(kochat_args: KochatArguments, stage: str) -> list[dict[str, Any]]:
    """The stage's rows (read in its layout, which checks every record), at least two when some are held out."""
    from kochat_trl.data.layouts import load_stage_data

    rows = load_stage_data(kochat_args.dataset_name, stage).rows[: kochat_args.max_samples]
    if kochat_args.eval_fraction > 0 and len(rows) < 2:
        raise DataError(
            f"{kochat_args.dataset_name}: {len(rows)} usable row(s) cannot be split into train and eval; "
            "add data or set eval_fraction: 0"
        )
    return rows


def _verify_template(kochat_args: KochatArguments) -> None:
    from kochat_trl.data.templates import check_template_name

    try:
        check_template_name(kochat_args.template)  # unknown names fail here, before any model is loaded
    except ConfigError as error:
        raise ConfigError(f"template: {error}") from None


def _verify_one_quantization(model_args: Any) -> None:
    if model_args.load_in_8bit and model_args.load_in_4bit:
        raise ConfigError("load_in_8bit and load_in_4bit are both set; choose one")


def _verify_not_overwrite_and_resume(kochat_args: KochatArguments, training_args: Any) -> None:
    from kochat_trl.run.resume import resume_requested

    if kochat_args.overwrite and resume_requested(training_args):
        raise ConfigError(
            "overwrite and resume_from_checkpoint are both set; overwrite deletes the checkpoints, choose one"
        )


def _verify_sharding_without_quantization(sharding: str | None, model_args: Any) -> None:
    if sharding and (model_args.load_in_8bit or model_args.load_in_4bit):
        # Caught here because the libraries' own errors name neither flag: ZeRO-3 fails in from_pretrained with
        # "DeepSpeed Zero-3 is not compatible with passing a `device_map`" (k-bit loads one whole model per GPU);
        # FSDP with "Must flatten tensors with uniform dtype ... torch.uint8/int8" (bnb stores integer weights).
        flag = "load_in_8bit" if model_args.load_in_8bit else "load_in_4bit"
        raise ConfigError(
            f"{flag} does not combine with {sharding}; for (Q)LoRA launch with accelerate_configs/multi_gpu.yaml "
            f"(DDP), or set {flag}: false to shard the full model"
        )


def _verify_processes_joined(training_args: Any) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        # Without a GPU the processes never join one group: each would train alone and write the same output_dir.
        raise ConfigError(
            f"launched {launched} processes but they did not form one process group (no GPU found); "
            "pass --use_cpu true to train them together on CPU, or launch a single process"
        )


def _verify_fsdp_has_gpus(training_args: Any, sharding: str | None) -> None:
    import torch

    from kochat_trl.run.engines import FSDP_NEEDS_GPUS

    gpu = not getattr(training_args, "use_cpu", False) and torch.cuda.is_available()
    if sharding == "FSDP" and not gpu:
        raise ConfigError(FSDP_NEEDS_GPUS)


def _verify_model_named(model_args: Any) -> None:
    if not model_args.model_name_or_path:
        raise ConfigError("model_name_or_path is not set; give a hub id or a local model folder")


def _verify_lora_trains_on_a_full_model(model_args: Any) -> None:
    from kochat_trl.models.loading import adapter_base

    path = model_args.model_name_or_path
    base = adapter_base(path) if path and model_args.use_peft else None
    if base is None:
        return
    # The adapter would be trained on `path` merged into `base` (models.loading._from_pretrained), but PEFT records
    # `base` alone, so a later merge (kochat-trl merge, the pipeline's merged/) would build a different model.
    raise ConfigError(
        f"{path} is a LoRA adapter folder: a new LoRA adapter trained on it would name {base} as its base and "
        f"merge into the wrong model; merge it first (kochat-trl merge --adapter {path} -o {path}-merged) and set "
        f"model_name_or_path: {path}-merged, or set use_peft: false"
    )


def _verify_max_length_fits(training_args: Any, model_args: Any, context: int | None) -> None:
    max_length = getattr(training_args, "max_length", None)
    if context and max_length and max_length > context:
        raise ConfigError(
            f"max_length {max_length} exceeds the context of {model_args.model_name_or_path} "
            f"({context} positions in config.json); set max_length <= {context}"
        )


def check_model_path(name: str, path: str | None, will_build: bool = False) -> None:
    """A local folder that exists, or something shaped like a hub id (org/name) that is not a local path."""
    if not path or will_build or Path(path).exists():
        return
    first = path.split("/")[0]
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path) or Path(first).is_dir():
        hint = "; set init_tiny: true to build the embedded default there" if name == "model_name_or_path" else ""
        raise ConfigError(f"{path}: {name} is neither an existing folder nor a hub id (org/name){hint}")


def model_context_length(path: str | os.PathLike | None) -> int | None:
    """Positions the model at `path` (a local folder, or a LoRA adapter folder: its base) can attend to,
    read from config.json; None when unknown (a hub id, or a config without such a field)."""
    folder = Path(path) if path else None
    if folder is not None and not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        folder = Path(base) if base else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    keys = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
    return next((config[key] for key in keys if isinstance(config.get(key), int)), None)
