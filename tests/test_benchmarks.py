"""Every benchmark docs/performance.md cites runs at its smallest size, so a config change cannot break one unseen.

Smoke runs, not measurements: one repeat, no waiting for a quiet machine, results written to a scratch folder (never
over benchmarks/results). The slow tier: each takes from half a minute to a few minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_CONFIGS

pytestmark = pytest.mark.slow
# One repeat, no quiet-machine gate: the smoke run checks that the code path works, not how fast it is.
SMOKE = ["--repeats", "1", "--max-wait", "0", "--retries", "0", "--max-foreign", "1.0"]


def run_benchmark(script: str, out: Path, *args: str) -> dict:
    command = [sys.executable, str(REPO / "benchmarks" / script), *args, *SMOKE, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert out.with_suffix(".md").is_file()
    return json.loads(out.read_text(encoding="utf-8"))


def test_bench_pipeline_prints_every_stage_and_the_start_up(tmp_path):
    config = yaml.safe_load((TINY_CONFIGS / "pipeline.yaml").read_text())
    config["overrides"] = {
        "sft": {"max_steps": 10, "eval_steps": 10, "save_steps": 10},
        "rm": {"max_steps": 10, "eval_steps": 10, "save_steps": 10},
        "ppo": {"total_episodes": 64, "eval_prompts": 4, "eval_samples_per_prompt": 1, "curve_points": 0},
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    payload = run_benchmark("bench_pipeline.py", tmp_path / "p.json", "--config", str(tmp_path / "pipeline.yaml"))
    assert set(payload["median_s"]) == {
        "sft",
        "rm",
        "ppo",
        "merge",
        "decoding",
        "conversations",
        "start-up (imports, base)",
        "total (process)",
    }
    assert 0 < payload["median_s"]["start-up (imports, base)"] < payload["total_s"]
    assert "min / median / max" in (tmp_path / "p.md").read_text()


def test_bench_stages_runs_the_training_stages_on_the_tiny_model(tmp_path):
    payload = run_benchmark(
        "bench_stages.py",
        tmp_path / "s.json",
        "--model",
        "tiny",
        "--stages",
        "sft,rm,ppo",
        "--steps",
        "2",
        "--episodes",
        "16",
    )
    assert payload["benchmark"] == "stages"


def test_bench_kochatgpt_runs_every_variant_on_the_tiny_model(tmp_path):
    payload = run_benchmark("bench_kochatgpt.py", tmp_path / "k.json", "--model", "tiny", "--steps", "2")
    assert payload["benchmark"] == "kochatgpt"


def test_bench_shared_base_runs_with_kogpt2_random_s_cpu_profile(tmp_path):
    """`small` is kogpt2-random's CPU profile (its 4-rollout batches once broke on whitened rewards); run on the
    tiny model here, it checks the profile's settings without building a 125M model."""
    payload = run_benchmark("bench_shared_base.py", tmp_path / "b.json", "--model", "tiny", "--profile", "small")
    assert payload["profile"] == "small" and payload["model_bytes"]["shared"] < payload["model_bytes"]["separate"]


def test_bench_gpu_code_path_runs_on_cpu(tmp_path):
    payload = run_benchmark(
        "bench_gpu.py",
        tmp_path / "g.json",
        "--device",
        "cpu",
        "--models",
        "skt/kogpt2-base-v2",
        "--stages",
        "sft",
        "--precisions",
        "bf16",
        "--seq-len",
        "16",
        "--batch-size",
        "1",
        "--steps",
        "2",
    )
    assert payload["benchmark"] == "gpu"
