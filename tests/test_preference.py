"""DPO, KTO and ORPO (recipes/dpo.py) from the tiny SFT model on the bundled rankings, judged like PPO, and
`kochat-trl compare-methods`: every method on the same held-out answers."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import TINY_CONFIGS, load_recipe, recipe_exit, run_recipe, write_json
from transformers import AutoModelForCausalLM, AutoTokenizer

from kochat_trl.cli import main
from kochat_trl.data.templates import saved_template_name
from kochat_trl.eval.judge import JUDGE_KEYS

METHODS = ["ppo", "dpo", "kto", "orpo"]
SLOW_TIER_FIRST = ["ppo", "dpo"]


def _compare_methods(run_dir: Path, methods: list[str]) -> SimpleNamespace:
    assert main(["compare-methods", "--run", str(run_dir), "--methods", ",".join(methods)]) == 0
    return SimpleNamespace(dir=run_dir, rows=json.loads((run_dir / "methods" / "methods.json").read_text()))


@pytest.fixture(scope="module")
def dpo_run(pipeline_run, tmp_path_factory) -> SimpleNamespace:
    """`kochat-trl compare-methods --methods ppo,dpo` on a copy of the session's pipeline run: trains DPO (300 steps),
    reuses PPO. The default tier trains DPO briefly (`test_dpo_trains_briefly_and_writes_what_every_stage_writes`)."""
    run_dir = Path(shutil.copytree(pipeline_run.dir, tmp_path_factory.mktemp("methods") / "run"))
    return _compare_methods(run_dir, SLOW_TIER_FIRST)


@pytest.fixture(scope="module")
def methods_run(dpo_run, tmp_path_factory) -> SimpleNamespace:
    """Every preference method on a copy of `dpo_run`: trains KTO and ORPO, reuses PPO and DPO."""
    run_dir = Path(shutil.copytree(dpo_run.dir, tmp_path_factory.mktemp("all-methods") / "run"))
    return _compare_methods(run_dir, METHODS)


def _metrics(run_dir: Path, method: str) -> dict:
    return json.loads((run_dir / method / "metrics.json").read_text())


@pytest.mark.slow
def test_dpo_learns_the_rankings_and_fixes_what_sft_left(dpo_run):
    metrics = _metrics(dpo_run.dir, "dpo")
    # DPO's own view, on the 254 held-out pairs: 0.885, margin 5.7 (0 at the start: policy = reference).
    assert metrics["implicit_accuracy"] >= 0.84 and metrics["implicit_margin"] > 3.0, metrics
    # The judge on the 848 held-out answers to seen topics (same prompts, sampling and seed as PPO): good 0.479 ->
    # 0.801, polite 0.48 -> 0.83, faithful 0.99 -> 0.96 (compare-methods' DPO row). Before the SFT data had
    # conversations: 0.467 -> 0.752 (307 answers became good, 65 stopped); at lr 5e-4: +0.15.
    flips = metrics["judge_flips"]
    assert flips["good_gain"] > 0.2 and flips["good_gain"] > 8 * flips["good_gain_se"], flips
    before, after = metrics["judge_before"], metrics["judge_after"]
    assert after["faithful_rate"] >= before["faithful_rate"] - 0.08 and after["on_topic_rate"] >= 0.95
    # The stage-2 reward model agrees (+1.00 +- 0.09), at KL 0.86.
    gain, error = metrics["reward_after"] - metrics["reward_before"], metrics["reward_gain_se"]
    assert 0.03 < error < 0.15 and gain > 5 * error, metrics
    assert 0 < metrics["kl"] < 2.0 and metrics["kl_within_bound"] is True
    assert after["broken_rate"] <= 0.002  # at most 2 of 960 answers
    assert (metrics["trainer"], metrics["beta"], metrics["loss_type"]) == ("dpo", 1.0, ["sigmoid"])
    assert metrics["global_step"] == 300 and metrics["train_rows"] == 2284 and metrics["eval_rows"] == 254
    assert metrics["params"]["reference_extra"] == 0  # LoRA: the reference is the adapter disabled


@pytest.mark.slow
def test_dpo_writes_what_every_stage_writes(dpo_run):
    out = dpo_run.dir / "dpo"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "config.yaml",
        "metrics.json",
        "log_history.json",
        "curves.png",
        "train.log",
        "checkpoint-300/trainer_state.json",
    ):
        assert (out / name).is_file(), name
    assert saved_template_name(AutoTokenizer.from_pretrained(out)) == "kochatgpt_short"
    assert yaml.safe_load((out / "config.yaml").read_text())["beta"] == 1.0
    logged = [json.loads(line) for line in (out / "train.log").read_text().splitlines()]
    assert len([entry for entry in logged if "rewards/margins" in entry and "loss" in entry]) == 30


@pytest.mark.slow
def test_every_method_is_a_row_judged_on_the_same_answers(methods_run):
    rows = methods_run.rows
    assert [row["method"] for row in rows] == METHODS
    assert {key for row in rows for key in row} >= {
        "method",
        "reward_before",
        "reward_after",
        "kl",
        "win_rate",
        "judge",
        "wall_time_s",
        "peak_rss_mb",
        "trainable_params",
    }
    # The same SFT answers before training for every method: the same prompts, sampling, seed and reward model.
    assert len({row["reward_before"] for row in rows}) == 1 and {row["eval_answers"] for row in rows} == {960}
    for row in rows:
        assert set(row["judge"]) == set(JUDGE_KEYS)
        assert all(math.isfinite(row[key]) for key in ("reward_after", "kl", "win_rate")), row
        assert row["trainable_params"] == 294_912  # LoRA r=16 on q/k/v/o + lm_head, the same for all
        assert row == {**row, **{"reward_after": _metrics(methods_run.dir, row["method"])["reward_after"]}}
    trained = [row for row in rows if row["method"] != "ppo"]
    assert all(row["wall_time_s"] > 1 and row["peak_rss_mb"] > 100 for row in trained)
    assert next(row for row in rows if row["method"] == "ppo")["peak_rss_mb"] is None  # trained by the pipeline
    for method in ("kto", "orpo"):
        assert _metrics(methods_run.dir, method)["global_step"] == 300
    markdown = (methods_run.dir / "methods" / "methods.md").read_text()
    assert all(f"| {method} | " in markdown for method in METHODS) and "Warning" not in markdown
    assert (methods_run.dir / "methods" / "methods.png").stat().st_size > 10_000


@pytest.mark.slow
def test_compare_methods_again_reuses_finished_methods(dpo_run, capsys):
    before = {method: (dpo_run.dir / method / "metrics.json").stat().st_mtime_ns for method in SLOW_TIER_FIRST}
    capsys.readouterr()
    assert main(["compare-methods", "--run", str(dpo_run.dir), "--methods", "dpo,ppo"]) == 0
    out = capsys.readouterr().out
    assert "dpo: finished" in out and "ppo: finished" in out
    after = {method: (dpo_run.dir / method / "metrics.json").stat().st_mtime_ns for method in SLOW_TIER_FIRST}
    assert after == before
    rows = json.loads((dpo_run.dir / "methods" / "methods.json").read_text())
    assert [row["method"] for row in rows] == ["dpo", "ppo"]
    assert rows[0] == next(row for row in dpo_run.rows if row["method"] == "dpo")


@pytest.mark.slow
def test_pipeline_with_methods_shows_the_table(dpo_run, tmp_path):
    config = yaml.safe_load((TINY_CONFIGS / "pipeline.yaml").read_text())
    config["methods"] = ["dpo"]
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    run_dir = Path(shutil.copytree(dpo_run.dir, tmp_path / "run"))
    assert main(["pipeline", "--config", str(tmp_path / "pipeline.yaml"), "--output_dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert [row["method"] for row in report["methods"]] == ["ppo", "dpo"]
    assert "## Alignment methods" in (run_dir / "report.md").read_text() and "methods" in report["wall_time_s"]


def test_dpo_trains_briefly_and_writes_what_every_stage_writes(tiny_stages, tmp_path):
    """The DPO stage end to end at a smoke size (its 300-step learning run is the slow tier's `dpo_run`)."""
    out = tmp_path / "dpo"
    brief = ["--max_steps", "20", "--logging_steps", "5", "--save_steps", "10", "--max_samples", "512"]
    brief += ["--eval_prompts", "8", "--eval_samples_per_prompt", "2"]
    metrics = run_recipe(
        "dpo",
        "dpo.yaml",
        "--model_name_or_path",
        str(tiny_stages["sft"]),
        "--reward_model_path",
        str(tiny_stages["rm"]),
        "--output_dir",
        str(out),
        *brief,
    )
    for name in ("adapter_model.safetensors", "config.yaml", "metrics.json", "log_history.json", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-20" / "trainer_state.json").is_file()
    judged = metrics["judge_after"]
    assert metrics["global_step"] == 20 and judged["answers"] + judged["unseen"]["answers"] == 16
    losses = [entry["loss"] for entry in json.loads((out / "log_history.json").read_text()) if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    # 20 steps already rank the 254 held-out pairs above chance (0.5; measured 0.770, s.e. about 0.03); the logged
    # loss itself is too noisy at this length to fall monotonically (0.83, 1.35, 1.31, 0.62).
    assert metrics["implicit_accuracy"] >= 0.65 and metrics["implicit_margin"] > 0


def test_compare_methods_reuses_the_pipeline_s_ppo(pipeline_run, tmp_path, capsys):
    run_dir = Path(shutil.copytree(pipeline_run.dir, tmp_path / "run"))
    before = (run_dir / "ppo" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["compare-methods", "--run", str(run_dir), "--methods", "ppo"]) == 0
    assert "ppo: finished" in capsys.readouterr().out
    assert (run_dir / "ppo" / "metrics.json").stat().st_mtime_ns == before
    rows = json.loads((run_dir / "methods" / "methods.json").read_text())
    assert [row["method"] for row in rows] == ["ppo"] and rows[0]["eval_answers"] == 960
    assert rows[0]["reward_after"] == _metrics(run_dir, "ppo")["reward_after"]
    assert "| ppo | " in (run_dir / "methods" / "methods.md").read_text()


def test_with_lora_the_reference_is_the_sft_model_at_step_zero(tiny_stages, tmp_path):
    from kochat_trl.config.parsing import parse_recipe_args
    from kochat_trl.models import loading, lora
    from kochat_trl.rl import preference

    recipe = load_recipe("dpo")
    script_args, training_args, model_args = parse_recipe_args(
        recipe.make_parser(),
        [
            "--config",
            str(TINY_CONFIGS / "dpo.yaml"),
            "--model_name_or_path",
            str(tiny_stages["sft"]),
            "--reward_model_path",
            str(tiny_stages["rm"]),
            "--output_dir",
            str(tmp_path / "dpo"),
        ],
    )
    tokenizer = loading.load_tokenizer(model_args)
    data = preference.preference_dataset("dpo", "bundled:rm", 0.1, 42, max_samples=32)
    policy = loading.load_causal_lm(model_args, tokenizer)
    trainer = preference.build_trainer(
        "dpo",
        training_args,
        tokenizer,
        policy,
        data["train"],
        peft_config=lora.build_peft_config(model_args, policy, "CAUSAL_LM"),
    )
    assert trainer.ref_model is None  # no second copy
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    ids = torch.tensor(
        [tokenizer.apply_chat_template(data["train"][0]["prompt"] + data["train"][0]["chosen"])["input_ids"]]
    )
    sft = AutoModelForCausalLM.from_pretrained(tiny_stages["sft"]).eval()
    with torch.no_grad():
        with model.disable_adapter():
            reference = model(input_ids=ids).logits
        assert torch.equal(reference, sft(input_ids=ids).logits)
        assert torch.allclose(model(input_ids=ids).logits, reference, atol=1e-6)  # LoRA B = 0 at the start


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--beta", "0"], "beta must be > 0"),
        (["--loss_type", "sigmoidd"], "loss_type 'sigmoidd' is not one DPOTrainer knows"),
        (["--trainer", "kto", "--loss_type", "sigmoid"], "--loss_type: invalid choice: 'sigmoid' (choose from 'kto'"),
        (["--model_name_or_path", "{tmp}/no-sft"], "no-sft: model_name_or_path is neither an existing folder"),
        (["--dataset_name", "{tmp}/ties.json"], "ties.json: no usable rm rows left"),
        (["--reward_model_path", ""], "reward_model_path is not set"),
        (["--eval_prompts", "0"], "eval_prompts must be at least 1"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_nothing_written(tiny_stages, tmp_path, capsys, extra, message):
    ties = [
        {"prompt": prompt, "completion_0": "네.", "completion_1": "아니요.", "ranking": [0, 0]}
        for prompt in ("김치는?", "서울은?")
    ]  # every record ties its answers: no preference left
    write_json(tmp_path / "ties.json", ties)
    output = tmp_path / "out"
    code = recipe_exit(
        "dpo",
        TINY_CONFIGS / "dpo.yaml",
        "--model_name_or_path",
        str(tiny_stages["sft"]),
        "--reward_model_path",
        str(tiny_stages["rm"]),
        "--output_dir",
        str(output),
        *(value.replace("{tmp}", str(tmp_path)) for value in extra),
    )
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1, error
    assert not output.exists()


def test_compare_methods_refuses_a_folder_without_sft_and_unknown_methods(tmp_path, capsys):
    assert main(["compare-methods", "--run", str(tmp_path), "--methods", "dpo"]) == 2
    assert f"{tmp_path / 'sft'}: no finished sft stage" in capsys.readouterr().err
    assert main(["compare-methods", "--run", str(tmp_path), "--methods", "dpo,sft"]) == 2
    assert "methods: sft; choose from ppo, rloo, grpo, dpo, kto, orpo" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
