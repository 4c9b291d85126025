"""Every shipped recipe config parses with its recipe's own parser (no unknown keys, valid values)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, load_recipe

from kochat_trl.config.parsing import parse_recipe_args
from kochat_trl.data.templates import check_template_name
from kochat_trl.pipeline import PipelineConfig

CONFIGS = sorted((REPO / "kochat_trl" / "configs").glob("*/*.yaml"))
RECIPE_OF = {
    "sft": "sft",
    "reward": "reward",
    "ppo": "ppo",
    "rloo": "rl",
    "grpo": "rl",
    "dpo": "dpo",
    "kto": "dpo",
    "orpo": "dpo",
    "reward_lora": "reward",
    "ppo_shared": "ppo",
}
MODELS = ("tiny", "kogpt2", "polyglot-ko-1.3b", "polyglot-ko-5.8b", "exaone-4.0-1.2b")


def test_every_model_has_the_three_stage_configs():
    for model in MODELS:
        stems = {path.stem for path in (REPO / "kochat_trl" / "configs" / model).glob("*.yaml")}
        assert stems >= {"sft", "reward", "ppo", "dpo", "kto", "orpo"}, model


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem in RECIPE_OF], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_config_parses(path: Path):
    recipe = load_recipe(RECIPE_OF[path.stem])
    # bf16 is what a GPU run wants; this CPU check turns it off so only the keys and values are checked.
    script_args, training_args, model_args = parse_recipe_args(
        recipe.make_parser(), ["--config", str(path), "--bf16", "false"]
    )
    check_template_name(script_args.template)
    assert not (model_args.load_in_8bit and model_args.load_in_4bit)
    assert training_args.output_dir.startswith(f"runs/{path.parent.name}/")
    if path.parent.name == "polyglot-ko-5.8b" and path.stem in ("sft", "reward"):
        assert model_args.load_in_4bit and model_args.use_peft and training_args.gradient_checkpointing
    if path.parent.name == "polyglot-ko-1.3b" and path.stem in ("sft", "reward"):
        assert model_args.load_in_8bit and model_args.use_peft


def test_pipeline_config_loads():
    config = PipelineConfig.load(REPO / "kochat_trl" / "configs" / "tiny" / "pipeline.yaml")
    assert config.base_model is None and set(config.stages) == {"sft", "rm", "ppo"}


def test_shared_base_pipeline_config_chains_the_lora_reward_model_into_shared_ppo():
    import yaml

    config = PipelineConfig.load(REPO / "kochat_trl" / "configs" / "tiny" / "pipeline_shared.yaml")
    assert config.stages["rm"].endswith("reward_lora.yaml") and config.stages["ppo"].endswith("ppo_shared.yaml")
    rm, ppo = (yaml.safe_load((REPO / path).read_text()) for path in (config.stages["rm"], config.stages["ppo"]))
    assert rm["use_peft"] is True and ppo["shared_base"] is True
    for model in ("polyglot-ko-1.3b", "polyglot-ko-5.8b", "exaone-4.0-1.2b"):  # LoRA everywhere: shared by default
        folder = REPO / "kochat_trl" / "configs" / model
        rm, ppo = (yaml.safe_load((folder / name).read_text()) for name in ("reward.yaml", "ppo.yaml"))
        assert ppo["shared_base"] is True and rm["use_peft"] is True
        assert rm["model_name_or_path"] == ppo["model_name_or_path"] == f"runs/{model}/sft-merged"
        assert ppo["reward_model_path"] == rm["output_dir"]
