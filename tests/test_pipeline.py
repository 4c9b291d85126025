"""`kochat-trl pipeline` end to end on the embedded default; reruns redo only unfinished stages and resume
them from their newest checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from kochat_trl.cli import main


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    assert main(["pipeline", "--output_dir", str(run_dir)]) == 0
    return run_dir


def _metrics(run_dir, stage):
    return json.loads((run_dir / stage / "metrics.json").read_text())


def test_report_numbers_match_stage_metrics(pipeline_run):
    report = json.loads((pipeline_run / "report.json").read_text())
    sft, rm, ppo = (_metrics(pipeline_run, stage) for stage in ("sft", "rm", "ppo"))
    assert report["sft"]["eval_loss_start"] == sft["eval_loss_start"]
    assert report["sft"]["eval_loss_end"] == sft["eval_loss_end"] < sft["eval_loss_start"]
    assert report["rm"]["accuracy"] == rm["accuracy"]
    for key in ("reward_before", "reward_after", "kl", "win_rate"):
        assert report["ppo"][key] == ppo[key]
    assert report["ppo"]["reward_after"] > report["ppo"]["reward_before"]
    assert set(report["wall_time_s"]) == {"sft", "rm", "ppo", "merge", "decoding"}
    assert all(seconds > 0 for seconds in report["wall_time_s"].values())
    markdown = (pipeline_run / "report.md").read_text()
    assert f"{ppo['reward_before']:.3f} → {ppo['reward_after']:.3f}" in markdown
    assert markdown.count("- SFT (") == 3 and markdown.count("- PPO (") == 3  # three samples before/after
    decoding = (pipeline_run / "decoding.md").read_text()
    assert all(f"| {name} |" in decoding for name in ("greedy", "beam", "sampling", "top_k", "top_p"))


def test_merged_models_load_with_plain_transformers(pipeline_run):
    policy = AutoModelForCausalLM.from_pretrained(pipeline_run / "merged" / "policy")
    reward = AutoModelForSequenceClassification.from_pretrained(pipeline_run / "merged" / "reward")
    assert policy.config.model_type == reward.config.model_type == "llama"
    assert not list((pipeline_run / "merged").rglob("*.bin"))


def test_rerun_after_deleting_ppo_redoes_only_ppo(pipeline_run, capsys):
    before = {stage: (pipeline_run / stage / "metrics.json").stat().st_mtime_ns for stage in ("sft", "rm", "ppo")}
    first_report = json.loads((pipeline_run / "report.json").read_text())
    shutil.rmtree(pipeline_run / "ppo")
    capsys.readouterr()
    assert main(["pipeline", "--output_dir", str(pipeline_run)]) == 0
    out = capsys.readouterr().out
    assert "sft: finished" in out and "rm: finished" in out and "ppo: finished" not in out
    after = {stage: (pipeline_run / stage / "metrics.json").stat().st_mtime_ns for stage in ("sft", "rm", "ppo")}
    assert after["sft"] == before["sft"] and after["rm"] == before["rm"] and after["ppo"] != before["ppo"]
    report = json.loads((pipeline_run / "report.json").read_text())
    assert report["wall_time_s"]["sft"] == first_report["wall_time_s"]["sft"]  # kept from the first run
    assert report["ppo"]["reward_after"] == _metrics(pipeline_run, "ppo")["reward_after"]


def test_rerun_resumes_an_unfinished_stage_from_its_checkpoint(pipeline_run, capsys):
    rm_dir = pipeline_run / "rm"
    finished = _metrics(pipeline_run, "rm")
    assert sorted(path.name for path in rm_dir.glob("checkpoint-*")) == ["checkpoint-200", "checkpoint-300"]
    # A crash after step 200: checkpoint-300 and metrics.json never written.
    shutil.rmtree(rm_dir / "checkpoint-300")
    (rm_dir / "metrics.json").unlink()
    kept = (rm_dir / "checkpoint-200" / "trainer_state.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["pipeline", "--output_dir", str(pipeline_run)]) == 0
    out = capsys.readouterr().out
    assert f"rm: unfinished, resuming from {rm_dir / 'checkpoint-200'}" in out
    assert "sft: finished" in out and "ppo: finished" not in out  # PPO is built on the RM: redone
    resumed = _metrics(pipeline_run, "rm")
    state = json.loads((rm_dir / "checkpoint-300" / "trainer_state.json").read_text())
    assert state["global_step"] == 300
    # Continued, not redone: a fresh run would have cleared the folder and saved checkpoint-200 again.
    assert (rm_dir / "checkpoint-200" / "trainer_state.json").stat().st_mtime_ns == kept
    # The resumed run restores optimizer, scheduler and RNG state: it ends where the uninterrupted run ended.
    assert resumed["accuracy"] == pytest.approx(finished["accuracy"], abs=1e-6)
    assert resumed["mean_margin"] == pytest.approx(finished["mean_margin"], rel=1e-3)


def test_pipeline_refuses_a_foreign_non_empty_folder(tmp_path, capsys):
    (tmp_path / "thesis.txt").write_text("not a run")
    assert main(["pipeline", "--output_dir", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["thesis.txt"]
