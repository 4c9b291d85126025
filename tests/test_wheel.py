"""The built wheel, installed without the source tree, runs the recipes and the pipeline from any folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # a wheel build, a fresh venv and a second pipeline run: minutes


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel .` of a copy of this checkout (setuptools from the test environment: no index is reachable). The
    copy leaves out build/, where an earlier build's modules would ride along into the wheel."""
    folder = tmp_path_factory.mktemp("wheel")
    leave_out = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "runs")
    source = Path(shutil.copytree(REPO, folder / "source", ignore=leave_out, symlinks=True))
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder), "."]
    subprocess.run(build, cwd=source, check=True, timeout=600)
    (built,) = folder.glob("kochat_trl-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment holding only the wheel; its dependencies come from the test environment's
    site-packages through a .pth line. Returns its bin/."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # A plain path line: the test environment's own .pth files (the editable install's finder) are not processed.
    (Path(site) / "kochat_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)]
    subprocess.run(install, check=True, timeout=600)
    return venv / "bin"


def run_installed(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1800, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_the_wheel_ships_the_recipes_and_the_bundled_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {name for name in names if name.startswith("kochat_trl/configs/") and name.endswith(".yaml")}
    in_checkout = {path.relative_to(REPO).as_posix() for path in (REPO / "kochat_trl" / "configs").glob("*/*.yaml")}
    assert shipped == in_checkout and len(shipped) == 36
    recipes = {"sft", "reward", "ppo", "rl", "dpo"}
    assert {f"kochat_trl/recipes/{name}.py" for name in recipes} <= names
    assert not any(name.startswith(("tests/", "recipes/", "benchmarks/")) for name in names)


def test_installed_wheel_imports_from_its_own_environment(installed, tmp_path):
    result = run_installed([str(installed / "python"), "-c", "import kochat_trl; print(kochat_trl.__file__)"], tmp_path)
    assert result.stdout.strip().startswith(str(installed.parent)), result.stdout


def test_installed_sft_runs_a_bundled_config_from_another_folder(installed, tmp_path):
    command = [str(installed / "kochat-trl"), "sft", "--config", "tiny/sft.yaml", "--init_tiny", "true"]
    command += ["--model_name_or_path", "base", "--output_dir", "sft", "--max_steps", "4", "--disable_tqdm", "true"]
    result = run_installed(command, tmp_path)
    metrics = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["eval_loss_end"] < metrics["eval_loss_start"]
    assert metrics["template"] == "kochatgpt_short"  # what tiny/sft.yaml sets
    assert "[kochat-trl] sft: eval loss" in result.stdout


def test_installed_pipeline_matches_the_checkout_pipeline(installed, tmp_path, pipeline_run):
    """Same code, same seeds: the wheel's `kochat-trl pipeline` reports the numbers the session's run reported."""
    run_installed([str(installed / "kochat-trl"), "pipeline", "--output_dir", "run"], tmp_path)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    expected = json.loads((pipeline_run.dir / "report.json").read_text())
    for stage, keys in (("sft", ("eval_loss_start", "eval_loss_end")), ("rm", ("accuracy", "mean_margin"))):
        assert {key: report[stage][key] for key in keys} == pytest.approx({key: expected[stage][key] for key in keys})
    assert report["ppo"]["reward_after"] == pytest.approx(expected["ppo"]["reward_after"], abs=1e-4)
    assert (tmp_path / "run" / "merged" / "policy" / "tokenizer_config.json").is_file()
