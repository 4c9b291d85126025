"""`kochat-trl ui` on the session's pipeline run: reading the run folder, compare/chat logic, the served app through
gradio_client (answers equal `kochat-trl generate`'s), and a real headless Chromium driven by selenium.

The app runs as the installed command in a child process on a free local port, with a bounded wait for it to
answer, and is stopped at the end of the module. The browser test skips when no chromium + chromedriver is found.
Set KOCHAT_UI_SCREENSHOT=PATH to also keep the browser test's Compare-tab screenshot there (docs/ui.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, plain_reward

from kochat_trl.cli import main
from kochat_trl.errors import KochatError
from kochat_trl.eval.judge import flags, judge_answer
from kochat_trl.ui import views
from kochat_trl.ui.limits import check_rows
from kochat_trl.ui.models import EMPTY_MESSAGE, EMPTY_PROMPT, ModelCache, chat_reply, compare, parse_options
from kochat_trl.ui.run_folder import held_out_prompts, open_run, stage_datasets

PROMPT = "김치에 대해 알려 주세요."
# The browser types a held-out question whose greedy SFT answer is 반말 and PPO's 합니다체 (the docs/ui.png picture).
BROWSER_PROMPT = "파리에 대해 간단히 설명해 줄 수 있나요?"
MODELS = ["base", "sft", "ppo"]
KOCHAT = str(Path(sys.executable).parent / "kochat-trl")
OFFLINE = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}
READY_TIMEOUT_S = 120
QUEUE_SIZE = 4  # the served app's bound on waiting requests (the default, 16, needs more requests to fill)


@pytest.fixture(scope="module")
def run(pipeline_run):
    return open_run(pipeline_run.dir)


@pytest.fixture(scope="module")
def cache(run) -> ModelCache:
    return ModelCache(run)


# ---------------------------------------------------------------------------------------------
# Reading the run folder


def test_a_finished_run_lists_its_models_curves_and_times(run, pipeline_run):
    folder = pipeline_run.dir
    assert run.problems == [] and run.finished
    assert run.model_names() == MODELS
    ppo = run.model("ppo")
    assert (ppo.model_path, ppo.adapter) == (folder / "sft", folder / "ppo")  # a LoRA adapter on the SFT model
    assert ppo.generate_arguments() == ["--model", str(folder / "sft"), "--adapter", str(folder / "ppo")]
    assert run.model("sft").generate_arguments() == ["--model", str(folder / "sft")]
    assert run.reward_model == folder / "rm"
    assert [caption for _, caption in run.curves()] == [
        "sft training curves",
        "rm training curves",
        "ppo training curves",
    ]
    assert list(run.wall_times()) == ["sft", "rm", "ppo", "merge", "decoding", "conversations"]
    with pytest.raises(KochatError, match=r"no model 'dpo'; this run has base, sft, ppo"):
        run.model("dpo")


def test_the_run_tab_shows_the_report_numbers_judge_table_and_wall_times(run):
    report = run.report
    text = views.report_markdown(run)
    assert f"| RM | held-out pairwise accuracy | {report['rm']['accuracy']:.3f} |" in text
    assert f"| PPO | KL to the SFT policy | {report['ppo']['kl']:.3f} |" in text
    judge = report["judge"]["ppo"]
    assert (
        f"| PPO | {report['ppo']['reward_after']:.3f} | {judge['good_rate']:.3f} | {judge['polite_rate']:.3f} | "
        f"{judge['on_topic_rate']:.3f} | {judge['faithful_rate']:.3f} | {judge['broken_rate']:.3f} | "
        f"{judge['hangul_share']:.3f} | {judge['repeat_rate']:.3f} |"
    ) in text
    # The page leads with the gold: the judge's good rate before and after PPO.
    before = report["judge"]["sft"]["good_rate"]
    assert text.startswith("Models: **base, sft, ppo**.\n\n**Good answers") and f"SFT {before:.3f} → PPO" in text
    assert "### Numbers (report.json)" in text and "not finished" not in text
    # The Compare tab's first prompts are the report's samples: answers PPO changed.
    assert held_out_prompts(run)[:4] == [sample["prompt"] for sample in report["ppo"]["samples"]]
    assert f"| sft | {report['wall_time_s']['sft']:.1f} |" in views.wall_time_markdown(run)
    assert views.curves_html(run).count("<figure") == 3
    assert "![" not in views.report_text(run) and "| RM | held-out pairwise accuracy |" in views.report_text(run)


def test_the_data_tab_reads_each_stage_with_its_drop_counts(run):
    datasets = {data.stage: data for data in stage_datasets(run, limit=3)}
    assert list(datasets) == ["sft", "rm", "ppo"]
    rm = datasets["rm"]
    assert (rm.source, rm.layout, rm.read, rm.candidates, rm.kept) == ("bundled:rm", "rm", 600, 3600, 2538)
    assert rm.dropped == {"empty": 0, "duplicate": 0, "tie": 1062}
    assert list(rm.rows[0]) == ["prompt", "chosen", "rejected"] and len(rm.rows) == 3
    assert (datasets["sft"].kept, datasets["ppo"].kept) == (850, 300)
    text = views.datasets_markdown(list(datasets.values()))
    assert (
        "layout rm: read 600 records, 3600 candidate pairs; kept 2538; dropped 1062 (empty 0, duplicate 0, tie 1062)"
        in text
    )
    assert text.count("\n| 3 | ") == 3  # three rows per stage


def test_held_out_prompts_are_ppo_s_eval_split(run):
    from kochat_trl.eval.decoding import default_prompts

    prompts = held_out_prompts(run)  # the same 60 prompts, the report's samples moved to the front
    assert len(prompts) == 60 and sorted(prompts) == sorted(default_prompts(60))


def test_not_a_run_folder_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    assert main(["ui", "--run", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error == (
        f"kochat-trl: error: {tmp_path}: not a kochat-trl run folder (no pipeline_state.json, "
        f"report.json, base/ or sft/); make one with `kochat-trl pipeline --output_dir {tmp_path}`\n"
    )
    assert main(["ui", "--run", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_queue_size_out_of_range_is_one_line_and_exit_2(pipeline_run, capsys):
    assert main(["ui", "--run", str(pipeline_run.dir), "--queue-size", "0"]) == 2
    assert capsys.readouterr().err == "kochat-trl: error: --queue-size must be in 1..1000, got 0\n"


def test_without_gradio_the_command_says_how_to_install_it(pipeline_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    assert main(["ui", "--run", str(pipeline_run.dir)]) == 2
    assert capsys.readouterr().err == "kochat-trl: error: the ui needs gradio: pip install 'kochat-trl[ui]'\n"


@pytest.fixture
def half_run(pipeline_run, tmp_path) -> Path:
    """A run folder as a crash during RM training leaves it: base/ and sft/ finished, no rm/, ppo/ or report."""
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "pipeline_state.json").write_text('{"wall_time_s": {"sft": 12.5}}', encoding="utf-8")
    for stage in ("base", "sft"):
        (folder / stage).symlink_to(pipeline_run.dir / stage)
    (folder / "rm").mkdir()
    return folder


def test_a_half_finished_run_says_what_is_missing_and_still_answers(half_run):
    run = open_run(half_run)
    assert run.model_names() == ["base", "sft"]
    assert run.problems == [
        "rm/: not finished (no metrics.json): answers get no reward-model score",
        "ppo/: not finished (no metrics.json)",
        "report.json: not written yet (the pipeline has not finished)",
    ]
    text = views.report_markdown(run)
    assert "**This run is not finished**" in text and f"`kochat-trl pipeline --output_dir {half_run}`" in text
    assert "held-out pairwise accuracy" not in text
    assert views.wall_time_markdown(run) == "### Wall time\n\n| step | seconds |\n|---|---:|\n| sft | 12.5 |\n"
    results = compare(ModelCache(run), PROMPT, models=["sft"])
    assert [(item["model"], item["reward"]) for item in results] == [("sft", None)]
    assert "no reward model" in views.answers_html(results)
    assert [data.stage for data in stage_datasets(run)] == ["sft"]


def test_a_moved_run_applies_its_adapters_to_its_own_sft(pipeline_run, tmp_path):
    folder = tmp_path / "moved"
    folder.mkdir()
    (folder / "sft").symlink_to(pipeline_run.dir / "sft")
    for name, base in (("ppo", "/gone/run/sft"), ("dpo", "EleutherAI/polyglot-ko-1.3b")):
        (folder / name).mkdir()
        (folder / name / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
        (folder / name / "metrics.json").write_text("{}")
    run = open_run(folder)
    assert run.model_names() == ["sft", "ppo", "dpo"]
    assert (run.model("ppo").model_path, run.model("ppo").adapter) == (folder / "sft", folder / "ppo")
    assert run.model("dpo").generate_arguments() == [
        "--model",
        "EleutherAI/polyglot-ko-1.3b",
        "--adapter",
        str(folder / "dpo"),
    ]


# ---------------------------------------------------------------------------------------------
# Compare and chat without a browser


def test_compare_answers_with_every_model_scores_and_judges_loading_each_once(run, cache):
    from kochat_trl.eval.decoding import _load_reward

    results = compare(cache, PROMPT)
    assert [item["model"] for item in results] == MODELS
    assert all(set(item) == {"model", "answer", "reward", "judge"} for item in results)
    sft, ppo = results[1], results[2]
    assert sft["answer"].startswith("김치는") and sft["judge"] == flags(judge_answer(PROMPT, sft["answer"]))
    # SFT's register is a coin toss (measured: 반말 here); PPO's answer is what the best writer would write.
    expected = {"broken": False, "hangul_share": 1.0, "on_topic": True, "faithful": True, "repeats": False}
    expected["seen"] = True
    assert {key: sft["judge"][key] for key in expected} == expected
    assert ppo["judge"] == {**expected, "polite": True, "good": True}, ppo
    model, tokenizer = _load_reward(str(run.reward_model))
    for item in results:  # the reward model's own score of the (prompt, answer) chat, as any client computes it
        assert abs(item["reward"] - plain_reward(model, tokenizer, PROMPT, item["answer"])) < 1e-5
    again = compare(cache, f"  {PROMPT}\n")  # surrounding whitespace is not part of the prompt
    assert again == results
    assert dict(cache.loads) == {"base": 1, "sft": 1, "ppo": 1, "rm": 1}
    with pytest.raises(KochatError, match=r"^Type a prompt first"):
        compare(cache, "  \n")
    with pytest.raises(KochatError, match=r"unknown decoding strategy 'fast'"):
        compare(cache, PROMPT, "fast")
    html = views.answers_html(results)
    assert html.count('class="kochat-answer"') == 3 and f"RM score {sft['reward']:.3f}" in html


def test_chat_is_multi_turn_formatted_by_the_chat_template(cache):
    generator = cache.generator("sft")
    turns, given, note = chat_reply(cache, "sft", [], PROMPT)
    assert note is None
    assert given == generator.format(PROMPT) == f"### Instruction(명령어):\n{PROMPT}\n\n### Response(응답):"
    assert turns == [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": compare(cache, PROMPT, models=["sft"])[0]["answer"]},
    ]
    turns, given, note = chat_reply(cache, "sft", turns, "서울을 소개해 주세요.")
    assert len(turns) == 4 and turns[2] == {"role": "user", "content": "서울을 소개해 주세요."}
    assert given == generator.tokenizer.apply_chat_template(turns[:3], tokenize=False, add_generation_prompt=True)
    assert given.startswith(f"### Instruction(명령어):\n{PROMPT}\n\n### Response(응답): {turns[1]['content']}")
    with pytest.raises(KochatError, match=f"^{EMPTY_MESSAGE}$"):
        chat_reply(cache, "sft", turns, " ")
    # Past the context the oldest whole turn is left out of what the model sees, and the page says so; the page
    # itself keeps every turn.
    question = {"role": "user", "content": "부산이 궁금합니다."}
    limit = len(generator.tokenizer(generator.format([*turns[2:], question]))["input_ids"]) + 64  # 64: max_new_tokens
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generator, "context_limit", lambda: limit)
        longer, given, note = chat_reply(cache, "sft", turns, "부산이 궁금합니다.")
    assert longer[:4] == turns and given.startswith("### Instruction(명령어):\n서울을 소개해 주세요.")
    assert note.endswith("dropped the oldest 1 turn; the model sees the last 2)")


def test_generate_options_parse_like_gen_flags():
    assert parse_options("repetition_penalty=1.2\ntop_k=20, do_sample=true") == {
        "repetition_penalty": 1.2,
        "top_k": 20,
        "do_sample": True,
    }
    assert parse_options("") == {}
    with pytest.raises(
        KochatError, match="^generate option 'speed' is not one this page passes on; it takes do_sample, "
    ):
        parse_options("speed=2")
    assert views.options_markdown("beam", {"top_k": 5}, 32) == (
        '`generate(**{"max_new_tokens": 32, "do_sample": false, "num_beams": 4, "no_repeat_ngram_size": 2, '
        '"early_stopping": true, "top_k": 5})`'
    )


# ---------------------------------------------------------------------------------------------
# Bounds on one request (kochat_trl.ui.limits): refused before any model loads

LONG = "가" * 200_000
REFUSALS = {
    "prompt 200,000 characters": (
        {"prompt": LONG},
        "the prompt has 200,000 characters; this page takes at most 2,000 (shorten it, or use kochat-trl generate "
        "on your own machine)",
    ),
    "max_new_tokens 100000": ({"max_new_tokens": 100_000}, "max new tokens must be in 1..512, got 100000"),
    "max_new_tokens 0": ({"max_new_tokens": 0}, "max new tokens must be in 1..512, got 0"),
    "max_new_tokens 1.5": ({"max_new_tokens": 1.5}, "max new tokens must be a whole number in 1..512, got 1.5"),
    "seed -1": ({"seed": -1}, "seed must be in 0..4294967295, got -1"),
    "9 options": (
        {"options": "\n".join(f"top_k={k}" for k in range(9))},
        "9 generate options given; this page takes at most 8",
    ),
    "options 5,000 characters": (
        {"options": "top_k=" + "1" * 5_000},
        "the generate options have 5,006 characters; this page takes at most 1,000",
    ),
    "custom_generate (loads code)": (
        {"options": "custom_generate=evil/repo"},
        "generate option 'custom_generate' is not one this page passes on; it takes do_sample, temperature, top_k, "
        "top_p, min_p, typical_p, repetition_penalty, no_repeat_ngram_size, num_beams, length_penalty, "
        "early_stopping, min_new_tokens",
    ),
    "max_length (beats max_new_tokens)": (
        {"options": "max_length=100000"},
        "generate option 'max_length' is not one this page passes on; it takes do_sample, temperature, top_k, "
        "top_p, min_p, typical_p, repetition_penalty, no_repeat_ngram_size, num_beams, length_penalty, "
        "early_stopping, min_new_tokens",
    ),
    "num_beams 1000": ({"options": "num_beams=1000"}, "generate option num_beams must be in 1..8, got 1000"),
    "top_p a list": ({"options": "top_p=[1]"}, "generate option top_p=[1] must be a number in 0..1"),
    "top_p text": ({"options": "top_p=high"}, "generate option top_p='high' must be a number in 0..1"),
    "do_sample a number": ({"options": "do_sample=1"}, "generate option do_sample=1 must be true or false"),
    "not KEY=VALUE": (
        {"options": "greedy"},
        "generate option 'greedy': expected KEY=VALUE, e.g. repetition_penalty=1.2",
    ),
}
DEFAULTS = {"prompt": PROMPT, "strategy": "greedy", "options": "", "max_new_tokens": 64, "seed": 0}


@pytest.fixture
def no_loading(run) -> ModelCache:
    """A cache whose models must never load: a refused request generates nothing."""

    def refuse(*args):
        raise AssertionError("a model was loaded for a refused request")

    return ModelCache(run, load_generator=refuse, load_reward=refuse)


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_bound_refuses_compare_and_chat_with_one_line_before_any_model_loads(no_loading, case):
    changes, message = REFUSALS[case]
    request = {**DEFAULTS, **changes}
    with pytest.raises(KochatError) as refused:
        compare(
            no_loading,
            request["prompt"],
            request["strategy"],
            parse_options(request["options"]),
            request["max_new_tokens"],
            request["seed"],
        )
    assert str(refused.value) == message
    with pytest.raises(KochatError) as refused:
        chat_reply(
            no_loading,
            "sft",
            [],
            request["prompt"],
            request["strategy"],
            parse_options(request["options"]),
            request["max_new_tokens"],
            request["seed"],
        )
    assert str(refused.value) == message.replace("the prompt has", "the message has")
    assert not no_loading.loads


def test_options_given_as_a_dict_are_bounded_too(no_loading):
    with pytest.raises(KochatError, match="^generate option 'streamer' is not one this page passes on"):
        compare(no_loading, PROMPT, overrides={"streamer": "x"})
    with pytest.raises(KochatError, match=r"^generate option temperature=nan must be a number in 0.01..10$"):
        chat_reply(no_loading, "sft", [], PROMPT, overrides={"temperature": float("nan")})
    assert check_rows(50) == 50
    with pytest.raises(KochatError, match=r"^rows per stage must be in 1..50, got 1000000$"):
        check_rows(1_000_000)


def test_a_page_reachable_from_other_machines_says_so():
    from kochat_trl.cli.ui import exposure_warning

    assert exposure_warning("127.0.0.1", False) is None
    assert exposure_warning("localhost", False) is None
    assert exposure_warning("::1", False) is None
    assert exposure_warning("0.0.0.0", False) == (
        "ui: --host 0.0.0.0 serves this page beyond this machine: anyone who can reach it can use the models and "
        "read the run folder's files (each request is bounded, not authenticated)"
    )
    assert exposure_warning("127.0.0.1", True).startswith("ui: a public gradio.live link serves this page beyond")
    assert exposure_warning("myhost.example", False).startswith("ui: --host myhost.example serves")


# ---------------------------------------------------------------------------------------------
# The served app


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "gradio_api/info", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(pipeline_run, tmp_path_factory):
    """`kochat-trl ui --run RUN --port N` in a child process; ready when it answers, stopped after the module."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path_factory.mktemp("ui") / "server.log"
    with open(log, "w", encoding="utf-8") as output:
        process = subprocess.Popen(
            [KOCHAT, "ui", "--run", str(pipeline_run.dir), "--port", str(port), "--queue-size", str(QUEUE_SIZE)],
            cwd=REPO,
            env=OFFLINE,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _answers(url):
            assert process.poll() is None, f"the ui exited with {process.returncode}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the ui did not answer in {READY_TIMEOUT_S} s: {log.read_text()}"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    text = log.read_text(encoding="utf-8")
    assert f"[kochat-trl] ui: {pipeline_run.dir} on {url} (Ctrl-C stops)" in text
    assert "Traceback" not in text, text[-3000:]


def test_the_compare_api_gives_each_model_s_kochat_trl_generate_answer(server, run, capsys):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False)
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/compare"]
    results = client.predict(PROMPT, "greedy", api_name="/compare")
    assert [item["model"] for item in results] == MODELS
    for item in results:  # the `kochat-trl generate` command line (its main(), in this process: imports paid once)
        arguments = [
            "generate",
            *run.model(item["model"]).generate_arguments(),
            "--prompt",
            PROMPT,
            "--strategy",
            "greedy",
        ]
        assert main(arguments) == 0
        assert capsys.readouterr().out == item["answer"] + "\n", item["model"]
        assert item["judge"] == flags(judge_answer(PROMPT, item["answer"]))
        assert isinstance(item["reward"], float)
    # Submitted at once, they queue: seeded sampling gives the same answers before and after another request.
    jobs = [client.submit(PROMPT, strategy, api_name="/compare") for strategy in ("sampling", "greedy", "sampling")]
    first, greedy, last = (job.result(timeout=300) for job in jobs)
    assert greedy == results and first == last and first != greedy
    with pytest.raises(AppError, match=EMPTY_PROMPT.replace("(", r"\(").replace(")", r"\)")):
        client.predict("", "greedy", api_name="/compare")


@pytest.mark.parametrize(
    "case", ["prompt 200,000 characters", "max_new_tokens 100000", "9 options", "custom_generate (loads code)"]
)
def test_the_compare_api_answers_a_request_beyond_a_bound_with_its_message(server, case):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    changes, message = REFUSALS[case]
    request = {**DEFAULTS, **changes}
    client = Client(server, verbose=False)
    with pytest.raises(AppError, match=f"^{re.escape(message)}$"):
        client.predict(*request.values(), api_name="/compare")


def test_requests_beyond_the_queue_are_refused_and_the_others_answered(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    # 12 at once, each 3 models x 64 tokens: the first runs, QUEUE_SIZE wait, the rest find the queue full.
    jobs = [client.submit(PROMPT, "sampling", "min_new_tokens=64", 64, seed, api_name="/compare") for seed in range(12)]
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(len(job.result(timeout=300)))
        except Exception as error:  # gradio_client's error for a refused join
            outcomes.append(str(error))
    answered = [outcome for outcome in outcomes if outcome == len(MODELS)]
    refused = [outcome for outcome in outcomes if outcome != len(MODELS)]
    assert 1 <= len(answered) <= QUEUE_SIZE + 1 and len(answered) + len(refused) == 12, outcomes
    assert all("Queue is full" in str(outcome) for outcome in refused), refused
    # ...and the queue drained: the next request is answered.
    assert len(client.predict(PROMPT, api_name="/compare")) == len(MODELS)


def test_the_server_reads_no_file_outside_the_run_folder(server, pipeline_run):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def status(path: str) -> int:
        try:
            with opener.open(f"{server}gradio_api/file={urllib.parse.quote(path)}", timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    run = pipeline_run.dir.resolve()
    assert status(str(run / "report.md")) == 200  # the run's own files are served (its curves are shown so)
    for outside in ("/etc/passwd", str(REPO / "pyproject.toml"), f"{run}/../../etc/passwd", str(run.parent)):
        assert status(outside) in (403, 404), outside


def test_a_busy_port_is_one_line_and_exit_2(server, pipeline_run, capsys):
    port = urllib.parse.urlsplit(server).port
    assert main(["ui", "--run", str(pipeline_run.dir), "--port", str(port)]) == 2
    assert capsys.readouterr().err == (
        f"kochat-trl: error: cannot serve on 127.0.0.1:{port} (the port is in use); pass a free --port\n"
    )


def _browser():
    """(chromium, chromedriver) paths, or skip."""
    pytest.importorskip("selenium")
    names = ("chromium", "chromium-browser", "google-chrome")
    binary = next((found for name in names if (found := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no chromium + chromedriver on this machine (Debian: apt-get install chromium chromium-driver)")
    return binary, driver


@pytest.mark.slow
def test_a_real_browser_shows_the_report_and_the_answers(server, run, cache, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    binary, driver_path = _browser()
    options = Options()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(server)
        wait = WebDriverWait(browser, 60)
        report = wait.until(lambda page: page.find_element(By.ID, "kochat-report"))
        wait.until(lambda page: "held-out pairwise accuracy" in report.text)
        assert f"{run.report['rm']['accuracy']:.3f}" in report.text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#kochat-curves figure img")) == 3

        browser.find_element(By.XPATH, "//button[@role='tab' and normalize-space()='Compare']").click()
        prompt = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "#kochat-prompt textarea"))
        prompt.clear()
        prompt.send_keys(BROWSER_PROMPT)
        browser.find_element(By.ID, "kochat-compare-button").click()
        cards = WebDriverWait(browser, 180).until(lambda page: page.find_elements(By.CSS_SELECTOR, ".kochat-answer"))
        assert [card.get_attribute("data-model") for card in cards] == MODELS
        expected = compare(cache, BROWSER_PROMPT, models=["sft", "ppo"])
        shown = [card.find_element(By.CLASS_NAME, "kochat-text").get_attribute("textContent") for card in cards]
        assert shown[1:] == [item["answer"] for item in expected]
        assert [card.find_element(By.CLASS_NAME, "kochat-reward").text for card in cards[1:]] == [
            f"RM score {item['reward']:.3f}" for item in expected
        ]
        screenshot = tmp_path / "ui.png"
        assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 20_000
        if os.environ.get("KOCHAT_UI_SCREENSHOT"):
            shutil.copyfile(screenshot, os.environ["KOCHAT_UI_SCREENSHOT"])

        prompt.send_keys(Keys.CONTROL, "a")
        prompt.send_keys(Keys.DELETE)  # as a user empties it (clear() alone does not tell the page)
        browser.find_element(By.ID, "kochat-compare-button").click()
        message = wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#kochat-answers .kochat-message"))
        assert message[0].text == EMPTY_PROMPT
        requests = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
        urls = {
            event["params"]["request"]["url"] for event in requests if event["method"] == "Network.requestWillBeSent"
        }
        app = urllib.parse.urlsplit(server).netloc
        outside = [
            url
            for url in urls
            if url.split(":")[0] in ("http", "https", "ws", "wss") and urllib.parse.urlsplit(url).netloc != app
        ]
        assert outside == []  # the page reaches nothing but the app: no fonts, analytics or CDN from outside
    finally:
        browser.quit()
