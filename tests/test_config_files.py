"""`--config` names: a path from the current folder, else a bundled config; the recipe commands; wrong names."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO

from kochat_trl.cli import main
from kochat_trl.config.files import BUNDLED_CONFIGS, resolve_config
from kochat_trl.errors import ConfigError
from kochat_trl.pipeline import PipelineConfig

NOT_BUNDLED = (
    "(nor a bundled config: <model>/<stage>.yaml with model one of exaone-4.0-1.2b, kogpt2, polyglot-ko-1.3b, "
    "polyglot-ko-5.8b, tiny)"
)


def test_a_bundled_name_resolves_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = BUNDLED_CONFIGS / "tiny" / "sft.yaml"
    assert resolve_config("tiny/sft.yaml") == packaged
    assert resolve_config("recipes/configs/tiny/sft.yaml") == packaged  # the checkout's name, outside a checkout
    assert resolve_config(REPO / "recipes" / "configs" / "tiny" / "sft.yaml").read_bytes() == packaged.read_bytes()


def test_the_users_file_wins_over_the_bundled_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "sft.yaml").write_text("max_steps: 3\n")
    assert resolve_config("tiny/sft.yaml").resolve() == tmp_path / "tiny" / "sft.yaml"
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "tiny").mkdir()
    (tmp_path / "stages" / "tiny" / "sft.yaml").write_text("max_steps: 4\n")
    # Named by a pipeline file in stages/: its own folder first.
    assert resolve_config("tiny/sft.yaml", relative_to=tmp_path / "stages") == tmp_path / "stages" / "tiny" / "sft.yaml"


def test_an_unknown_config_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["sft", "--config", "tiny/sfy.yaml", "--output_dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: tiny/sfy.yaml: config file not found {NOT_BUNDLED}\n"
    assert list(tmp_path.iterdir()) == []


def test_a_pipeline_stage_config_that_is_nowhere_names_the_pipeline_file_and_the_stage(tmp_path, capsys):
    config = yaml.safe_load((BUNDLED_CONFIGS / "tiny" / "pipeline.yaml").read_text())
    config["stages"]["rm"] = "tiny/rewards.yaml"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as error:
        PipelineConfig.load(path)
    assert str(error.value) == f"{path}: stages.rm: tiny/rewards.yaml: config file not found {NOT_BUNDLED}"
    assert main(["pipeline", "--config", str(path), "--output_dir", str(tmp_path / "run")]) == 2
    assert "stages.rm: tiny/rewards.yaml: config file not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_pipeline_file_resolves_every_stage_to_a_bundled_file():
    config = PipelineConfig.load("tiny/pipeline.yaml")
    assert config.stages == {
        stage: str(BUNDLED_CONFIGS / "tiny" / name)
        for stage, name in (("sft", "sft.yaml"), ("rm", "reward.yaml"), ("ppo", "ppo.yaml"))
    }


@pytest.mark.parametrize(
    ("argv", "trainer", "config_class"),
    [
        (["rloo", "--config", "tiny/rloo.yaml"], "rloo", "RLOOConfig"),
        (["grpo", "--config", "tiny/grpo.yaml"], "grpo", "GRPOConfig"),
        (["grpo", "--config", "tiny/rloo.yaml", "--trainer", "rloo"], "rloo", "RLOOConfig"),  # --trainer decides
    ],
)
def test_the_rloo_and_grpo_commands_pick_their_trainer(monkeypatch, argv, trainer, config_class):
    from kochat_trl.config.parsing import parse_recipe_args
    from kochat_trl.recipes import steps

    launched = {}
    monkeypatch.setattr(
        steps, "run_recipe", lambda make_parser, _, args: launched.update(parser=make_parser, args=args)
    )
    assert main(argv) == 0
    script_args, training_args, _ = parse_recipe_args(launched["parser"](), launched["args"])
    assert (script_args.trainer, type(training_args).__name__) == (trainer, config_class)
