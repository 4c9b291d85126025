"""The console: known third-party messages are filtered (and only those), a stage shows one progress bar or a
few plain lines, every log entry lands in train.log, and report_to: tensorboard writes event files."""

from __future__ import annotations

import io
import json
import logging
import warnings
from types import SimpleNamespace

from conftest import run_recipe

from kochat_trl.run import console
from kochat_trl.run.progress import TRAIN_LOG, StageProgress, TrainLog


def test_known_warnings_are_filtered_and_new_ones_still_reach_the_user():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.install_known_filters()
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6", FutureWarning, stacklevel=1)
        warnings.warn("'pin_memory' argument is set as true but no accelerator is found", UserWarning, stacklevel=1)
        from trl.import_utils import TRLExperimentalWarning

        warnings.warn("You are importing from 'trl.experimental'.", TRLExperimentalWarning, stacklevel=1)
        # Not on the list: the same category with another message, another category with a listed message.
        warnings.warn("`some_option` is deprecated and will be removed in v6", FutureWarning, stacklevel=1)
        pin_memory = "'pin_memory' argument is set as true but no accelerator is found"
        warnings.warn(pin_memory, DeprecationWarning, stacklevel=1)
        warnings.warn("a brand-new problem", UserWarning, stacklevel=1)
    assert [(type(w.message), str(w.message)) for w in caught] == [
        (FutureWarning, "`some_option` is deprecated and will be removed in v6"),
        (DeprecationWarning, "'pin_memory' argument is set as true but no accelerator is found"),
        (UserWarning, "a brand-new problem"),
    ]
    assert all(reason for _, _, reason in console.KNOWN_WARNINGS)  # every filter says why


def test_known_log_message_is_filtered_by_logger_and_message(caplog):
    console.install_known_filters()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        logger.warning("4-bit weights could not be loaded")
        logging.getLogger("elsewhere").warning("Failed to load CPU gemm_4bit_forward from kernels-community")
    assert [(record.name, record.getMessage()) for record in caplog.records] == [
        ("bitsandbytes.backends.cpu.ops", "4-bit weights could not be loaded"),
        ("elsewhere", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ]


def test_the_offline_kernels_trust_line_is_filtered(caplog):
    """bitsandbytes asks the kernels package for a CPU kernel; with HF_HUB_OFFLINE=1 it logs this on every run."""
    console.install_known_filters()
    logger = logging.getLogger("kernels._internals.hf_hub")
    with caplog.at_level(logging.WARNING):
        logger.warning(
            "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face "
            "Hub is in offline mode."
        )
        logger.warning("Publisher not trusted")
    assert [record.getMessage() for record in caplog.records] == ["Publisher not trusted"]


def test_known_prints_are_dropped_only_when_quiet(monkeypatch, capsys):
    monkeypatch.setattr(console, "_quiet", True)
    with console.known_prints_dropped():
        print("===training policy===")
        print("the answer is 42")
    monkeypatch.setattr(console, "_quiet", False)  # --verbose
    with console.known_prints_dropped():
        print("===training policy===")
    assert capsys.readouterr().out == "the answer is 42\n===training policy===\n"


def _state(step: int, total: int = 9) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, max_steps=total, is_world_process_zero=True)


def test_progress_without_a_terminal_is_a_line_per_third_with_the_key_numbers():
    stream = io.StringIO()  # not a terminal
    progress = StageProgress("rm", ["loss", "eval_accuracy"], stream)
    progress.on_train_begin(None, _state(0), None)
    for step in range(1, 10):
        progress.on_log(None, _state(step), None, logs={"loss": 1.0 / step, "grad_norm": 3.0, "eval_accuracy": 0.5})
        progress.on_step_end(None, _state(step), None)
    progress.on_train_end(None, _state(9), None)
    lines = stream.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "[kochat-trl] rm: step 3/9, loss 0.333, eval_accuracy 0.500",
        "[kochat-trl] rm: step 6/9, loss 0.167, eval_accuracy 0.500",
    ]  # the last third is the recipe's result line


def test_progress_in_a_terminal_is_one_bar(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(stream, "isatty", lambda: True)
    progress = StageProgress("sft", ["loss"], stream)
    progress.on_train_begin(None, _state(0, 4), None)
    for step in range(1, 5):
        progress.on_log(None, _state(step, 4), None, logs={"loss": 2.0})
        progress.on_step_end(None, _state(step, 4), None)
    assert progress.bar.n == 4 and progress.bar.total == 4 and "loss 2.000" in progress.bar.postfix
    progress.on_train_end(None, _state(4, 4), None)
    drawn = stream.getvalue()
    assert drawn.startswith("\rsft:") and "\n" not in drawn  # redrawn in place, no plain lines


def test_train_log_appends_every_entry(tmp_path):
    log = TrainLog(tmp_path)
    for step, logs in ((1, {"loss": 2.5, "learning_rate": 0.001}), (2, {"eval_loss": 2.0})):
        log.on_log(None, _state(step), None, logs=logs)
    entries = [json.loads(line) for line in (tmp_path / TRAIN_LOG).read_text().splitlines()]
    assert entries == [{"step": 1, "loss": 2.5, "learning_rate": 0.001}, {"step": 2, "eval_loss": 2.0}]


def test_report_to_tensorboard_writes_event_files_into_the_stage_folder(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "sft"
    run_recipe(
        "sft",
        "sft.yaml",
        "--model_name_or_path",
        str(tiny_model_dir),
        "--init_tiny",
        "false",
        "--output_dir",
        str(out),
        "--max_steps",
        "6",
        "--logging_steps",
        "2",
        "--eval_steps",
        "6",
        "--save_strategy",
        "no",
        "--report_to",
        "tensorboard",
    )
    (run,) = {events.parent for events in out.glob("runs/*/events.out.tfevents.*")}
    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    losses = [event.step for event in accumulator.Scalars("train/loss")]
    assert losses == [2, 4, 6]
    logged = [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]
    assert [entry["step"] for entry in logged if "loss" in entry] == losses  # the same entries as train.log
