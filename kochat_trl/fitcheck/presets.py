"""Which model config fit-check measures: a built-in preset (`resources/fitcheck_presets.json`) or a local one.

The presets are the configs of the Korean checkpoints this project targets, as stored on the Hugging Face hub
(memory-relevant fields only), so fit-check works offline. Sources: huggingface.co/<name>/config.json and the
model cards.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kochat_trl.errors import KochatError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@functools.lru_cache(maxsize=1)
def preset_configs() -> dict[str, dict[str, Any]]:
    """Preset name → its config.json fields (with `model_type`), in the file's order."""
    from importlib import resources

    text = (resources.files("kochat_trl") / "resources" / "fitcheck_presets.json").read_text(encoding="utf-8")
    return json.loads(text)


def resolve_model_config(name_or_path: str) -> PretrainedConfig:
    """A preset name (case-insensitive), a local model folder, or a config.json path → a transformers config."""
    from transformers import AutoConfig

    preset_values = preset_configs()
    presets = {name.lower(): name for name in preset_values}
    if str(name_or_path).lower() in presets:
        name = presets[str(name_or_path).lower()]
        values = dict(preset_values[name])  # a copy: the cached presets stay intact
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        config.name_or_path = name
        return config
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise KochatError(
            f"{name_or_path}: not a local model folder or config.json, nor a known model "
            f"({', '.join(preset_values)}); the hub is not used here"
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
