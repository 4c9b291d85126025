"""`kochat-trl pipeline` end to end on the embedded default; reruns redo only unfinished stages and resume
them from their newest checkpoint."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, plain_reward
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from kochat_trl.cli import main
from kochat_trl.data.templates import saved_template_name
from kochat_trl.eval.decoding import default_prompts
from kochat_trl.eval.generation import Generator
from kochat_trl.eval.judge import JUDGE_KEYS

TRAINED_PROMPT = "### Instruction(명령어):\n{}\n\n### Response(응답):"  # kochatgpt_short, the tiny configs' template


@pytest.fixture(scope="module")
def run(pipeline_run):
    """The session's pipeline run folder (read only)."""
    return pipeline_run.dir


@pytest.fixture()
def run_copy(pipeline_run, tmp_path):
    """A copy of the session's pipeline run, for tests that delete or redo part of it."""
    return Path(shutil.copytree(pipeline_run.dir, tmp_path / "run"))


@pytest.fixture()
def quick_ppo_config(tmp_path) -> str:
    """The tiny pipeline config with a short PPO (a redone PPO stage only has to run, not to learn here)."""
    config = yaml.safe_load((REPO / "kochat_trl" / "configs" / "tiny" / "pipeline.yaml").read_text())
    config["overrides"] = {"ppo": {"total_episodes": 64, "eval_prompts": 8, "eval_samples_per_prompt": 1}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_console_is_short_and_clean(pipeline_run):
    """What a person reads when the pipeline runs without a terminal (a CI log, a file): stage result lines and
    the summary, no warnings, loading bars or bar redraws; the per-step numbers are in each stage's train.log."""
    output = pipeline_run.stdout + pipeline_run.stderr
    lines = output.splitlines()
    noise = re.compile(r"FutureWarning|UserWarning|TRLExperimentalWarning|pip install kernels|Loading weights|it/s")
    assert [line for line in lines if noise.search(line)] == []
    # 16 stage lines, the 12-line summary table, 4 samples of 3 lines and the report line: 41.
    assert "\r" not in output and len(lines) <= 41, output
    for expected in (
        "sft: eval loss 7.",
        "rm: held-out accuracy 0.",
        "ppo: good 0.",
        "merge: ",
        "decoding: 5 strategies on 4 prompts",
        "conversations: 60 held-out conversations, the answer on its own question's topic at turn 2 ",
        "kochat-trl pipeline:",
        "│ judge ",
        "report: ",
    ):
        assert sum(expected in line for line in lines) == 1, expected
    assert [line.split(": ")[0] for line in lines if line.startswith("[kochat-trl] sft: step ")] == [
        "[kochat-trl] sft",
        "[kochat-trl] sft",
    ]  # a line at each third, then the result line
    for stage, key, count in (("sft", "loss", 32), ("rm", "loss", 30), ("ppo", "objective/scores", 30)):
        entries = [json.loads(line) for line in (pipeline_run.dir / stage / "train.log").read_text().splitlines()]
        assert len([entry for entry in entries if key in entry]) == count, stage


def _metrics(run_dir, stage):
    return json.loads((run_dir / stage / "metrics.json").read_text())


def test_report_numbers_match_stage_metrics(run):
    report = json.loads((run / "report.json").read_text())
    sft, rm, ppo = (_metrics(run, stage) for stage in ("sft", "rm", "ppo"))
    assert report["sft"]["eval_loss_start"] == sft["eval_loss_start"]
    assert report["sft"]["eval_loss_end"] == sft["eval_loss_end"] < sft["eval_loss_start"]
    assert report["rm"]["accuracy"] == rm["accuracy"]
    for key in ("reward_before", "reward_after", "reward_gain_se", "kl", "win_rate"):
        assert report["ppo"][key] == ppo[key]
    assert set(report["wall_time_s"]) == {"sft", "rm", "ppo", "merge", "decoding", "conversations"}
    assert all(seconds > 0 for seconds in report["wall_time_s"].values())
    markdown = (run / "report.md").read_text()
    assert f"{ppo['reward_before']:.3f} → {ppo['reward_after']:.3f}" in markdown
    assert f"| PPO | standard error of the reward gain (paired answers) | {ppo['reward_gain_se']:.3f} |" in markdown
    samples = report["ppo"]["samples"]  # three changed answers to seen topics, one to a topic SFT never saw
    assert markdown.count("- SFT (RM ") == markdown.count("- PPO (RM ") == len(samples) == 4
    good = report["judge"]["ppo"]["good_rate"]
    assert "**Good answers (the rule-based judge, held-out prompts of topics SFT saw): SFT " in markdown
    assert f"PPO {good:.3f}.**" in markdown and "![gold against proxy](ppo/overoptimization.png)" in markdown
    decoding = (run / "decoding.md").read_text()
    assert all(f"| {name} |" in decoding for name in ("greedy", "beam", "sampling", "top_k", "top_p"))
    # The judge's rates of the SFT and PPO policies' held-out answers, next to the RM reward.
    for name, judged in (("sft", ppo["judge_before"]), ("ppo", ppo["judge_after"])):
        assert {key: report["judge"][name][key] for key in JUDGE_KEYS} == {key: judged[key] for key in JUDGE_KEYS}
        assert report["judge"][name]["unseen"] == {key: judged["unseen"][key] for key in (*JUDGE_KEYS, "answers")}
    assert report["ppo"]["curve"] == ppo["curve"] and report["ppo"]["judge_flips"] == ppo["judge_flips"]
    assert "| SFT | " in markdown and f"| PPO | {ppo['reward_after']:.3f} |" in markdown


def test_what_a_person_reads_has_no_broken_character(run):
    """The report's samples, the decoding comparison and the 480 held-out answers: not one U+FFFD."""
    report = json.loads((run / "report.json").read_text())
    assert report["judge"]["sft"]["broken_rate"] == report["judge"]["ppo"]["broken_rate"] == 0.0
    for name in ("report.md", "report.json", "decoding.md"):
        assert "\ufffd" not in (run / name).read_text(encoding="utf-8"), name
    # The samples a reader sees first are answers PPO changed on topics SFT saw, now good.
    assert all(sample["after"].endswith("니다.") for sample in report["ppo"]["samples"][:3])


def test_sft_answers_held_out_questions_with_the_bundled_sentences(run):
    """Readable, not just unbroken: for held-out questions about a topic SFT saw (including question forms it never
    saw), the greedy answer is faithful to that topic's bundled sentences (in 합니다체 or in 반말)."""
    from kochat_trl.eval.judge import asked_topic, judge_answer, topic_table

    generator = Generator.load(str(run / "sft"))
    prompts = [prompt for prompt in default_prompts(60) if not topic_table()[asked_topic(prompt)].held_out]
    answers = generator.generate([generator.format(prompt) for prompt in prompts], "greedy").answers
    recalled = [judge_answer(prompt, answer).faithful for prompt, answer in zip(prompts, answers, strict=True)]
    assert len(prompts) == 53 and sum(recalled) / len(recalled) >= 0.9, list(zip(prompts, answers, strict=True))


def test_conversations_stay_on_the_question_asked(run):
    """The multi-turn issue: from the second turn on, the answer was about the first question. On the 60 held-out
    conversations (topics SFT saw, every question in a form SFT never saw; 30 of 2 turns, 30 of 3), answered turn
    by turn greedily, the SFT and the PPO policy's answers are on their own question's topic at turn 2 and turn 3."""
    report = json.loads((run / "report.json").read_text())
    saved = json.loads((run / "conversations.json").read_text())
    for name in ("sft", "ppo"):
        rates = report["conversations"][name]
        assert rates == saved["models"][name.upper()]["rates"]
        assert [rates[turn]["answers"] for turn in ("turn_1", "turn_2", "turn_3", "last")] == [60, 60, 30, 60]
        # Measured: SFT 1.000 / 0.967 (turn 2 / turn 3), PPO 0.967 / 0.933 (seed 0, 2-core AMD EPYC).
        for turn in ("turn_2", "turn_3", "last"):
            assert rates[turn]["on_topic_rate"] >= 0.9, (name, turn, rates)
    markdown = (run / "report.md").read_text()
    assert "## Conversations: held-out questions of 2 and 3 turns" in markdown
    example = markdown.split("answered turn by turn by each model:")[1].split("##")[0]
    assert [line[:2] for line in example.splitlines() if line[:1].isdigit()] == ["1.", "2.", "3."]
    assert example.count("   - SFT: ") == example.count("   - PPO: ") == 3


def test_the_issues_chat_transcript_answers_each_question_asked(run):
    """The transcript the multi-turn issue was filed with, rerun in `kochat-trl chat` on merged/policy: every answer
    is about its own question (on topic and faithful), the follow-up "그럼 비빔밥은요?" included."""
    import io

    from kochat_trl.eval.chat import chat_loop
    from kochat_trl.eval.judge import judge_answer

    questions = ["김치에 대해 알려 주세요.", "그럼 비빔밥은요?", "비빔밥에 대해 알려 주세요."]
    questions += ["/reset", "비빔밥에 대해 알려 주세요."]
    output = io.StringIO()
    assert chat_loop(Generator.load(str(run / "merged" / "policy")), io.StringIO("\n".join(questions)), output) == 4
    answers = [line.removeprefix("> ") for line in output.getvalue().splitlines()[1:] if "history cleared" not in line]
    asked = [question for question in questions if question != "/reset"]
    for question, answer in zip(asked, answers[:4], strict=True):
        judged = judge_answer(question, answer)
        assert judged.on_topic and judged.faithful, (question, answer, output.getvalue())


def test_every_saved_folder_formats_prompts_with_its_training_template(run):
    """The template travels with every tokenizer the run saved, so each folder generates with the template it was
    trained with (before, merged folders fell back to kochatgpt and its preamble)."""
    folders = [
        "base",
        "sft",
        "rm",
        "ppo",
        "ppo/value",
        "merged/policy",
        "merged/reward",
        *(str(path.relative_to(run)) for path in run.glob("*/checkpoint-*")),
    ]
    assert any("checkpoint-" in folder for folder in folders)
    for folder in folders:
        assert saved_template_name(AutoTokenizer.from_pretrained(run / folder)) == "kochatgpt_short", folder
    expected = TRAINED_PROMPT.format("김치는 무엇인가요?")
    sft, ppo, merged = (str(run / name) for name in ("sft", "ppo", "merged/policy"))
    for generator in (Generator.load(merged), Generator.load(sft), Generator.load(sft, adapter=ppo)):
        assert generator.template_name == "kochatgpt_short"
        assert generator.format("김치는 무엇인가요?") == expected


def test_template_flag_overrides_the_saved_one_and_says_so(run, capsys):
    policy = str(run / "merged" / "policy")
    assert (
        main(
            [
                "generate",
                "--model",
                policy,
                "--prompt",
                "김치는 무엇인가요?",
                "--template",
                "kochatgpt",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert f"template kochatgpt replaces the chat template saved in {policy} (kochatgpt_short)" in err
    assert Generator.load(policy, template="kochatgpt").format("김치").startswith("Below is an instruction")


def test_plain_transformers_clients_get_the_projects_answers_and_scores(run, capsys):
    """transformers.pipeline with chat messages answers as `kochat-trl generate --strategy greedy` does; the
    merged reward model read with AutoModelForSequenceClassification scores as the project does; the generation
    config carries eos and pad for serving clients (vLLM, TGI)."""
    from transformers import pipeline

    from kochat_trl.data.templates import prompt_ids
    from kochat_trl.eval.decoding import _load_reward
    from kochat_trl.eval.rewards import score_answers, score_responses

    policy, reward = run / "merged" / "policy", run / "merged" / "reward"
    chat = pipeline("text-generation", model=str(policy))
    prompts = default_prompts(4)
    answers = []
    for prompt in prompts:
        # Greedy (the text-generation pipeline samples at temperature 0.7 unless told otherwise).
        reply = chat([{"role": "user", "content": prompt}], do_sample=False, max_new_tokens=64)[0]["generated_text"][-1]
        assert main(["generate", "--model", str(policy), "--prompt", prompt, "--strategy", "greedy"]) == 0
        ours = capsys.readouterr().out
        assert reply["role"] == "assistant" and ours == reply["content"].strip() + "\n" and len(ours) > 10
        answers.append(ours.strip())
    generation_config = json.loads((policy / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(policy)
    assert (
        (generation_config["eos_token_id"], generation_config["pad_token_id"])
        == (tokenizer.eos_token_id, tokenizer.pad_token_id)
        == (2, 0)
    )

    model = AutoModelForSequenceClassification.from_pretrained(reward).eval()
    reward_tokenizer = AutoTokenizer.from_pretrained(reward)
    plain = [
        plain_reward(model, reward_tokenizer, prompt, answer) for prompt, answer in zip(prompts, answers, strict=True)
    ]
    project_model, project_tokenizer = _load_reward(str(reward))
    ours = score_answers(project_model, project_tokenizer, prompts, answers)  # compare-decoding's scoring
    assert max(abs(a - b) for a, b in zip(plain, ours, strict=True)) < 1e-5
    # PPO's own scoring of generated ids (prompt ids + answer ids up to eos) reads the same number.
    eos = reward_tokenizer.eos_token_id
    answer_ids = [reward_tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [eos] for answer in answers]
    ppo_scores = score_responses(
        project_model, project_tokenizer, [prompt_ids(project_tokenizer, p) for p in prompts], answer_ids
    )
    assert max(abs(a - b) for a, b in zip(plain, ppo_scores, strict=True)) < 1e-5
    assert len(set(round(score, 3) for score in plain)) > 1  # real, different scores


def test_merged_models_load_with_plain_transformers(run):
    policy = AutoModelForCausalLM.from_pretrained(run / "merged" / "policy")
    reward = AutoModelForSequenceClassification.from_pretrained(run / "merged" / "reward")
    assert policy.config.model_type == reward.config.model_type == "llama"
    assert not list((run / "merged").rglob("*.bin"))


def test_rerun_after_deleting_ppo_redoes_only_ppo(run_copy, quick_ppo_config, capsys):
    before = {stage: (run_copy / stage / "metrics.json").stat().st_mtime_ns for stage in ("sft", "rm", "ppo")}
    first_report = json.loads((run_copy / "report.json").read_text())
    shutil.rmtree(run_copy / "ppo")
    capsys.readouterr()
    assert main(["pipeline", "--config", quick_ppo_config, "--output_dir", str(run_copy)]) == 0
    out = capsys.readouterr().out
    assert "sft: finished" in out and "rm: finished" in out and "ppo: finished" not in out
    after = {stage: (run_copy / stage / "metrics.json").stat().st_mtime_ns for stage in ("sft", "rm", "ppo")}
    assert after["sft"] == before["sft"] and after["rm"] == before["rm"] and after["ppo"] != before["ppo"]
    report = json.loads((run_copy / "report.json").read_text())
    assert report["wall_time_s"]["sft"] == first_report["wall_time_s"]["sft"]  # kept from the first run
    assert report["ppo"]["reward_after"] == _metrics(run_copy, "ppo")["reward_after"]


@pytest.mark.slow
def test_rerun_resumes_an_unfinished_stage_from_its_checkpoint(run_copy, quick_ppo_config, capsys):
    rm_dir = run_copy / "rm"
    finished = _metrics(run_copy, "rm")
    assert sorted(path.name for path in rm_dir.glob("checkpoint-*")) == ["checkpoint-200", "checkpoint-300"]
    # A crash after step 200: checkpoint-300 and metrics.json never written.
    shutil.rmtree(rm_dir / "checkpoint-300")
    (rm_dir / "metrics.json").unlink()
    kept = (rm_dir / "checkpoint-200" / "trainer_state.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["pipeline", "--config", quick_ppo_config, "--output_dir", str(run_copy)]) == 0
    out = capsys.readouterr().out
    assert f"rm: unfinished, resuming from {rm_dir / 'checkpoint-200'}" in out
    assert "sft: finished" in out and "ppo: finished" not in out  # PPO is built on the RM: redone
    resumed = _metrics(run_copy, "rm")
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


def test_the_summarys_time_row_fits_one_line_on_a_loaded_machine():
    """The console test's line count assumes one line per table row: a loaded machine's three-digit stage times
    wrapped the row when every step was listed (measured: sft 267s, rm 103s, ppo 191s)."""
    from kochat_trl.cli.pipeline import _times

    loaded = {"sft": 266.8, "rm": 102.81, "ppo": 191.3, "merge": 0.16, "decoding": 2.07, "conversations": 17.61}
    assert _times(loaded) == "sft 267s, rm 103s, ppo 191s, merge+decoding+conversations 20s"
    assert len(_times({**loaded, "sft": 1266.8})) <= 69  # the summary table's result column
