"""Where a YAML config named by the user is: their own path first, else one bundled with the package.

The bundled configs (`kochat_trl/configs/<model>/<stage>.yaml`, shown in a checkout as `recipes/configs`) ship in
the wheel, so `kochat-trl sft --config recipes/configs/tiny/sft.yaml` (or `--config tiny/sft.yaml`) works from
any folder after a plain `pip install`.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from kochat_trl.errors import ConfigError

BUNDLED_CONFIGS = Path(str(resources.files("kochat_trl") / "configs"))
# How the bundled configs are named in a source checkout and in the docs.
_BUNDLED_PREFIXES = ("recipes/configs/", "kochat_trl/configs/")


def bundled_config(name: str) -> Path:
    """A bundled config by its name under the configs folder, e.g. `tiny/pipeline.yaml`."""
    return BUNDLED_CONFIGS / name


def bundled_configs(model: str = "tiny") -> Path:
    """The folder of one model's bundled configs."""
    return BUNDLED_CONFIGS / model


def resolve_config(path: str | os.PathLike, relative_to: str | os.PathLike | None = None) -> Path:
    """`path` from `relative_to` (the folder of the file that names it), else as given (absolute, or from the current
    folder), else the bundled config of that name; a ConfigError naming where it looked when none exists."""
    given = Path(path)
    candidates = [given]
    if not given.is_absolute():
        if relative_to is not None:
            candidates.insert(0, Path(relative_to) / given)
        name = given.as_posix()
        for prefix in _BUNDLED_PREFIXES:
            name = name.removeprefix(prefix)
        candidates.append(BUNDLED_CONFIGS / name)
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        where = "" if given.is_absolute() else f" (nor a bundled config: {_bundled_examples()})"
        raise ConfigError(f"{path}: config file not found{where}")
    return found


def _bundled_examples() -> str:
    models = sorted(folder.name for folder in BUNDLED_CONFIGS.iterdir() if folder.is_dir())
    return f"<model>/<stage>.yaml with model one of {', '.join(models)}"
