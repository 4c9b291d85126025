"""`kochat-trl <stage> --launch ACCELERATE_CONFIG …`: every mistake is one line and exit 2 before any process is
spawned (`os.execv` is never reached), and a clean command becomes exactly `accelerate launch … -m
kochat_trl.recipes.<stage> …`. The real 2-process launch is in the engines tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from kochat_trl.cli import main

CONFIGS = REPO / "accelerate_configs"


@pytest.fixture
def exec_calls(monkeypatch) -> list:
    calls: list = []
    monkeypatch.setattr(os, "execv", lambda path, args: calls.append(list(args)))
    return calls


def _launch(tmp_path: Path, tiny_model_dir: Path, *arguments: str, stage: str = "sft") -> list[str]:
    return [
        stage,
        *arguments,
        "--model_name_or_path",
        str(tiny_model_dir),
        "--init_tiny",
        "false",
        "--output_dir",
        str(tmp_path / "out"),
    ]


REFUSALS = {
    # The new user: launched directly this printed 47 lines and exited 1.
    "fsdp on CPU": (
        [
            "--launch",
            str(CONFIGS / "fsdp.yaml"),
            "--num_processes",
            "2",
            "--config",
            "tiny/sft.yaml",
            "--use_cpu",
            "true",
        ],
        "error: fsdp.yaml needs GPUs: on CPU accelerate runs it as plain DDP (nothing sharded, weights loaded on "
        "rank 0 only); launch with accelerate_configs/cpu_multiprocess.yaml, or deepspeed_zero3.yaml to shard on CPU",
    ),
    "8 GPU processes, no GPU": (
        ["--launch", str(CONFIGS / "multi_gpu.yaml"), "--config", "tiny/sft.yaml"],
        "error: the launch starts 8 processes but this machine has 0 GPUs; pass --use_cpu true to train them "
        "together on CPU, or --num_processes 1",
    ),
    "a typo in the recipe settings": (
        ["--launch", str(CONFIGS / "cpu_multiprocess.yaml"), "--config", "tiny/sft.yaml", "--learning_rate", "abc"],
        "error: --learning_rate: invalid float value: 'abc'",
    ),
    "no config file": (
        ["--launch", "nothere.yaml", "--config", "tiny/sft.yaml"],
        "error: nothere.yaml: --launch config file not found; pass one of accelerate_configs/*.yaml",
    ),
    "--launch without a value": (
        ["--config", "tiny/sft.yaml", "--launch"],
        "error: --launch needs a value: kochat-trl STAGE --launch ACCELERATE_CONFIG [--num_processes N] "
        "[--launch_args '…accelerate launch flags…'] --config FILE [recipe settings]",
    ),
    "4-bit under ZeRO-3": (
        [
            "--launch",
            str(CONFIGS / "deepspeed_zero3.yaml"),
            "--num_processes",
            "2",
            "--config",
            "tiny/sft.yaml",
            "--use_cpu",
            "true",
            "--use_peft",
            "true",
            "--load_in_4bit",
            "true",
        ],
        "error: load_in_4bit does not combine with DeepSpeed ZeRO-3; for (Q)LoRA launch with "
        "accelerate_configs/multi_gpu.yaml (DDP), or set load_in_4bit: false to shard the full model",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_mistake_is_one_line_and_exit_2_before_any_process_starts(case, tmp_path, tiny_model_dir, exec_calls, capsys):
    arguments, line = REFUSALS[case]
    with pytest.raises(SystemExit) as stopped:
        main(_launch(tmp_path, tiny_model_dir, *arguments))
    assert stopped.value.code == 2
    assert capsys.readouterr().err == line + "\n"
    assert exec_calls == [] and not (tmp_path / "out").exists()


def test_a_bad_accelerate_config_names_the_file(tmp_path, tiny_model_dir, exec_calls, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("distributed_type: [MULTI_GPU\n", encoding="utf-8")
    with pytest.raises(SystemExit) as stopped:
        main(_launch(tmp_path, tiny_model_dir, "--launch", str(broken), "--config", "tiny/sft.yaml"))
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {broken}: not a YAML accelerate config (")
    not_accelerate = tmp_path / "sft.yaml"
    not_accelerate.write_text("learning_rate: 1e-3\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        main(_launch(tmp_path, tiny_model_dir, "--launch", str(not_accelerate), "--config", "tiny/sft.yaml"))
    assert capsys.readouterr().err == (
        f"error: {not_accelerate}: not an accelerate config (no distributed_type); see accelerate_configs/\n"
    )
    assert exec_calls == []


def test_a_checked_command_becomes_accelerate_launch_of_the_recipe_module(tmp_path, tiny_model_dir, exec_calls, capsys):
    config = str(CONFIGS / "deepspeed_zero2.yaml")
    arguments = _launch(
        tmp_path,
        tiny_model_dir,
        "--launch",
        config,
        "--num_processes",
        "2",
        "--launch_args",
        "--mixed_precision no",
        "--config",
        "tiny/sft.yaml",
        "--use_cpu",
        "true",
        stage="rloo",
    )
    arguments[arguments.index("--config") + 1] = "tiny/rloo.yaml"
    assert main(arguments) == 0
    recipe = arguments[arguments.index("--config") :]
    assert exec_calls == [
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            config,
            "--num_processes",
            "2",
            "--mixed_precision",
            "no",
            "-m",
            "kochat_trl.recipes.rl",
            *recipe,
            "--trainer",
            "rloo",
        ]
    ]
    err = capsys.readouterr().err
    assert "rloo: settings and data checked; accelerate launch --config_file" in err
    assert not (tmp_path / "out").exists()  # nothing written by the check
    assert "ACCELERATE_USE_DEEPSPEED" not in os.environ  # the engine's variables were set for the check only


@pytest.mark.engines
def test_launch_trains_two_processes_as_one_group(tmp_path, tiny_model_dir):
    output = tmp_path / "out"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "kochat-trl"),
            "sft",
            "--launch",
            str(CONFIGS / "cpu_multiprocess.yaml"),
            "--config",
            "tiny/sft.yaml",
            "--use_cpu",
            "true",
            "--max_steps",
            "2",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--init_tiny",
            "false",
            "--output_dir",
            str(output),
            "--disable_tqdm",
            "true",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((output / "log_history.json").read_text())
    # 765 training rows, 32 per process: 2 processes take 64 a step, 12 steps an epoch; 1 process would be at 2/24.
    assert history[-1]["epoch"] == pytest.approx(2 / 12)
    assert json.loads((output / "metrics.json").read_text())["global_step"] == 2
