from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

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
    from kochat_trl.models.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny") / "base", seed=0)


REPO = Path(__file__).resolve().parents[1]
TINY_CONFIGS = REPO / "kochat_trl" / "configs" / "tiny"


def load_recipe(name: str):
    """The recipe module kochat_trl.recipes.NAME (sft, reward, ppo, rl, dpo)."""
    import importlib

    return importlib.import_module(f"kochat_trl.recipes.{name}")


def run_recipe(name: str, config: str, *overrides: str) -> dict:
    """Run a recipe in-process exactly as `python -m kochat_trl.recipes.NAME --config CONFIG ...` would."""
    from kochat_trl.config.parsing import parse_recipe_args

    module = load_recipe(name)
    argv = ["--config", str(TINY_CONFIGS / config), "--disable_tqdm", "true", *overrides]
    return module.main(*parse_recipe_args(module.make_parser(), argv))


def recipe_exit(name: str, config: Path, *arguments: str) -> int:
    """The exit code of the recipe's entry point (`python recipes/NAME.py --config CONFIG ...`) run in-process: what
    it prints goes to the test's capsys. Several child processes in the suite check the same path end to end, with
    the imports' own output (test_recipes.py's script test, the pipeline console test)."""
    from kochat_trl.recipes.steps import run_recipe as recipe_entry

    module = load_recipe(name)
    with pytest.raises(SystemExit) as stopped:
        recipe_entry(module.make_parser, module.main, ["--config", str(config), *arguments])
    return stopped.value.code


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> SimpleNamespace:
    """`kochat-trl pipeline` once per test session, as a user runs it: the installed command in a child process,
    its output captured (not a terminal). Its trained stages are what the tests of every stage read; a test that
    changes a folder works on a copy. (Started at collection instead, to overlap the tests before the first one
    that needs it, the default tier took 5 min 17 s instead of 4 min 49 s: two cores do not run both at once.)"""
    reused = os.environ.get("KOCHAT_TEST_PIPELINE_RUN")  # a developer's shortcut: a finished run, copied
    if reused:
        run_dir = tmp_path_factory.mktemp("pipeline") / "run"
        shutil.copytree(reused, run_dir)
        return SimpleNamespace(dir=run_dir, stdout="", stderr="")
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    command = [str(Path(sys.executable).parent / "kochat-trl"), "pipeline", "--output_dir", str(run_dir)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return SimpleNamespace(dir=run_dir, stdout=result.stdout, stderr=result.stderr)


# Short stages with a checkpoint every 2 steps (PPO: every update) so that every kill point comes round in seconds.
SHORT_PIPELINE = {
    "stages": {"sft": "tiny/sft.yaml", "rm": "tiny/reward.yaml", "ppo": "tiny/ppo.yaml"},
    "overrides": {
        "sft": {"max_steps": 8, "eval_steps": 4, "save_steps": 2, "logging_steps": 1, "max_samples": 160},
        "rm": {"max_steps": 6, "eval_steps": 3, "save_steps": 2, "logging_steps": 1, "max_samples": 120},
        "ppo": {
            "total_episodes": 64,
            "eval_prompts": 4,
            "eval_samples_per_prompt": 1,
            "save_strategy": "steps",
            "save_steps": 1,
            "curve_points": 2,
            "curve_prompts": 2,
            "curve_samples_per_prompt": 1,
        },
    },
    "decoding_strategies": ["greedy", "sampling"],
    "decoding_prompts": 2,
}


def short_pipeline_config(folder: Path) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(SHORT_PIPELINE))
    return path


def pipeline_command(config: Path, run_dir: Path) -> list[str]:
    # `python -m kochat_trl` from the repository: the checkout under test, whatever is installed.
    return [sys.executable, "-m", "kochat_trl", "pipeline", "--config", str(config), "--output_dir", str(run_dir)]


CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def short_pipeline_run(tmp_path_factory) -> Path:
    """SHORT_PIPELINE run to the end once per session (~30 s alone): what the kill and disk tests compare with."""
    folder = tmp_path_factory.mktemp("short-pipeline")
    run_dir = folder / "run"
    result = subprocess.run(
        pipeline_command(short_pipeline_config(folder), run_dir),
        cwd=REPO,
        capture_output=True,
        text=True,
        env=CHILD_ENV,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def tiny_stages(pipeline_run, tmp_path_factory) -> dict:
    """SFT then reward model on the embedded default with the shipped tiny configs: the pipeline run's stages
    (the pipeline runs each recipe's main() with those configs and seeds). `root` is scratch space for tests."""
    run = pipeline_run.dir
    return {
        "root": tmp_path_factory.mktemp("stages"),
        "base": run / "base",
        "sft": run / "sft",
        "rm": run / "rm",
        "sft_metrics": json.loads((run / "sft" / "metrics.json").read_text()),
        "rm_metrics": json.loads((run / "rm" / "metrics.json").read_text()),
    }


def adapter_and_reference_logits(sft_dir: Path, adapter_dir: Path):
    """Logits on one Korean prompt of: the SFT model, SFT + an RL run's LoRA adapter, and the same with the
    adapter disabled (what PPO/RLOO use as the reference)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    text = "### Instruction(명령어):\n김치는 무엇인가요?\n\n### Response(응답): 김치는"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    sft = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_dir), adapter_dir).eval()
    with torch.no_grad():
        sft_logits, trained_logits = sft(ids).logits, policy(ids).logits
        with policy.disable_adapter():
            reference_logits = policy(ids).logits
    return sft_logits, trained_logits, reference_logits


def plain_reward(model, tokenizer, prompt: str, answer: str) -> float:
    """A reward model's score of one (prompt, answer) chat with plain transformers, as any client would compute it."""
    import torch

    chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    inputs = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**inputs).logits[0, 0].item()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """One line saying what the default tier left out, and how to run it."""
    tiers = ("engines", "slow")  # -k deselects too: count only what the tiers left out
    deselected = sum(
        any(item.get_closest_marker(tier) for tier in tiers) for item in terminalreporter.stats.get("deselected", [])
    )
    if deselected and config.getoption("markexpr") == "not engines and not slow":
        terminalreporter.write_line(
            f"{deselected} tests of the engines and slow tiers deselected: "
            "run them with python -m pytest -m 'engines or slow'"
        )
