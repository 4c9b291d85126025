from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED_KOCHATGPT = Path(__file__).resolve().parents[2] / "shared" / "kochatgpt"


def write_json(path: Path, data, bom: bool = False) -> Path:
    text = json.dumps(data, ensure_ascii=False, indent=1)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture
def shared_kochatgpt() -> Path:
    if not SHARED_KOCHATGPT.is_dir():
        pytest.skip("../shared/kochatgpt is not present")
    return SHARED_KOCHATGPT


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded default, built once per test session."""
    from kochat_trl.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny") / "base", seed=0)
