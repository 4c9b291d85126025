"""Bad bytes in data (issue 27): every reader (`data convert` and each stage's recipe) refuses each case with one
line naming the file and the line or record, exits 2, and writes nothing; no model is ever loaded for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_CONFIGS, recipe_exit

from kochat_trl.cli import main as cli_main
from kochat_trl.data.readers import MAX_TEXT_CHARS

# The key a bad value goes into, per stage's layout (SFT prompt/completion, RM ranking, PPO prompts).
KEY = {"sft": "completion", "rm": "completion_1", "ppo": "prompt"}
NEWLINE = b"\n"
CONTROL_FIX = "remove it (only tab, newline and carriage return may appear)"


def records(stage: str, count: int = 4) -> list[dict]:
    if stage == "sft":
        return [{"prompt": f"질문 {i}", "completion": f"답변 {i}"} for i in range(count)]
    if stage == "rm":
        return [
            {"prompt": f"질문 {i}", "completion_0": f"좋은 답 {i}", "completion_1": f"나쁜 답 {i}", "ranking": [0, 1]}
            for i in range(count)
        ]
    return [{"prompt": f"질문 {i}"} for i in range(count)]


def json_lines(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def json_array(rows: list[dict]) -> bytes:
    return json.dumps(rows, ensure_ascii=False, indent=1).encode()


def with_value(stage: str, index: int, value) -> list[dict]:
    rows = records(stage)
    rows[index][KEY[stage]] = value
    return rows


# case -> (file suffix, content for a stage, expected message after "FILE: ")
def non_utf8(stage):
    lines = json_lines(records(stage)).split(b"\n")
    lines[2] = lines[2].replace("질문".encode(), "질문".encode("cp949"))  # a CP949 (Windows Korean) line
    return b"\n".join(lines)


def non_utf8_message(stage, content):
    offset = content.index("질문".encode("cp949"))
    return (
        f"line 3 (byte {offset}: {content[offset]:x}): not UTF-8 text; re-save the file as UTF-8 "
        "(Korean files from Windows are often CP949: iconv -f cp949 -t utf-8)"
    )


def trailing_comma_array(stage):
    return json_array(records(stage))[:-2] + b",\n]"  # `... },` then `]`


def trailing_comma_object(stage):
    lines = json_lines(records(stage)).split(b"\n")
    lines[1] = lines[1][:-1] + b",}"
    return b"\n".join(lines)


def bad_ranking(stage):
    rows = [{**row, "completion_2": f"보통 {i}", "ranking": [0, 1, 2]} for i, row in enumerate(records(stage))]
    rows[2]["ranking"] = [0, 3, 1]
    return json_lines(rows)


HUGE = "가" * 3_400_000  # 10.2 MB of UTF-8 in one record

CASES = {
    "non_utf8": (".jsonl", non_utf8, non_utf8_message),
    "nul_escaped": (
        ".jsonl",
        lambda stage: json_lines(with_value(stage, 2, "a\u0000b")),
        lambda stage, _: f"line 3: '{KEY[stage]}' holds control character U+0000; {CONTROL_FIX}",
    ),
    "nul_raw": (
        ".jsonl",
        lambda stage: json_lines(records(stage)).replace("질문 1".encode(), "질\x00문 1".encode()),
        lambda stage, _: f"line 2 column 14: control character U+0000 in the text; {CONTROL_FIX}",
    ),
    "control_in_array": (
        ".json",
        lambda stage: json_array(with_value(stage, 3, "벨\u0007소리")),
        lambda stage, _: f"record 3: '{KEY[stage]}' holds control character U+0007; {CONTROL_FIX}",
    ),
    "control_in_messages": (
        ".jsonl",
        lambda stage: json_lines(
            [{"messages": [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "네\x1b"}]}]
        ),
        lambda stage, _: f"line 1: 'messages[1].content' holds control character U+001B; {CONTROL_FIX}",
    ),
    "control_in_text_lines": (
        ".txt",
        lambda stage: "질문 하나\n질문\x1b둘\n질문 셋\n".encode(),
        lambda stage, _: f"line 2 column 3: control character U+001B in the text; {CONTROL_FIX}",
    ),
    "number_for_text": (
        ".jsonl",
        lambda stage: json_lines(with_value(stage, 1, 123)),
        lambda stage, _: f"line 2: '{KEY[stage]}' must be a string, got int 123; give it one string",
    ),
    "list_for_text": (
        ".json",
        lambda stage: json_array(with_value(stage, 0, ["질문", "둘"])),
        lambda stage, _: f"""record 0: '{KEY[stage]}' must be a string, got list ["질문", "둘"]; give it one string""",
    ),
    "number_in_kullm": (
        ".json",
        lambda stage: ("\ufeff" + json.dumps([{"instruction": "더하기", "input": 5, "output": "5"}])).encode(),
        lambda stage, _: "record 0: 'input' must be a string, got int 5; give it one string",
    ),
    "trailing_comma_array": (
        ".json",
        trailing_comma_array,
        lambda stage, content: (
            f"line {content.count(NEWLINE)} column 3: invalid JSON (trailing comma before ']'; remove the comma)"
        ),
    ),
    "trailing_comma_object": (
        ".jsonl",
        trailing_comma_object,
        lambda stage, content: (
            f"line 2: invalid JSON (trailing comma before '}}'; remove the comma at column "
            f"{len(content.split(NEWLINE)[1].decode()) - 1}); each line must be one JSON object"
        ),
    ),
    "bad_ranking": (
        ".jsonl",
        bad_ranking,
        lambda stage, _: (
            "line 3: bad ranking [0, 3, 1]; it must be a permutation of 0..2 such as [0, 1, 2] "
            "(ranking[i] = rank of completion_i, 0 = best; equal ranks mark a tie, skipped)"
        ),
    ),
    "huge_record": (
        ".jsonl",
        lambda stage: json_lines(with_value(stage, 2, HUGE)),
        lambda stage, _: (
            f"line 3: '{KEY[stage]}' is 3,400,000 characters long, over the {MAX_TEXT_CHARS:,} a text may hold "
            "(beyond any model's context; training keeps only max_length tokens); shorten the record or drop it"
        ),
    ),
}
# Cases that only one stage's layout has.
ONLY_STAGE = {
    "bad_ranking": "rm",
    "control_in_messages": "sft",
    "number_in_kullm": "sft",
    "control_in_text_lines": "ppo",
}

# reader -> (stage its data is read as, recipe module and tiny config, or None for `kochat-trl data convert`)
READERS = {
    "convert-sft": ("sft", None),
    "convert-rm": ("rm", None),
    "convert-ppo": ("ppo", None),
    "sft": ("sft", ("sft", "sft.yaml")),
    "rm": ("rm", ("reward", "reward.yaml")),
    "ppo": ("ppo", ("ppo", "ppo.yaml")),
    "rloo": ("ppo", ("rl", "rloo.yaml")),
    "grpo": ("ppo", ("rl", "grpo.yaml")),
    "dpo": ("rm", ("dpo", "dpo.yaml")),
    "kto": ("rm", ("dpo", "kto.yaml")),
    "orpo": ("rm", ("dpo", "orpo.yaml")),
    "dpo-prompts": ("ppo", ("dpo", "dpo.yaml")),  # DPO/KTO/ORPO's judged prompts (prompts_dataset)
}
MATRIX = [
    (case, reader) for case in CASES for reader, (stage, _) in READERS.items() if ONLY_STAGE.get(case, stage) == stage
]


class ModelLoaded(Exception):
    """Raised by every tokenizer and model loader in these tests: reaching one means the data was accepted."""


@pytest.fixture
def no_model_loads(monkeypatch, tmp_path_factory) -> Path:
    """No tokenizer or model loads (none could: the model folder is empty); the folder to name as the model."""
    from kochat_trl.models import loading
    from kochat_trl.rl import models

    def refuse(*args, **kwargs):
        raise ModelLoaded

    for module, name in [
        (loading, "load_tokenizer"),
        (loading, "load_causal_lm"),
        (loading, "load_reward_model"),
        (models, "load_ppo_models"),
        (models, "load_critic_free_models"),
    ]:
        monkeypatch.setattr(module, name, refuse)
    return tmp_path_factory.getbasetemp() / "bad_bytes_model"


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, bytes]]:
    """Each case's file per stage, written once (the 10 MB ones included)."""
    folder = tmp_path_factory.mktemp("bad_bytes")
    (tmp_path_factory.getbasetemp() / "bad_bytes_model").mkdir()  # an empty "model" folder: nothing loads from it
    files = {}
    for case, (suffix, build, _) in CASES.items():
        for stage in ("sft", "rm", "ppo"):
            if ONLY_STAGE.get(case, stage) != stage:
                continue
            content = build(stage)
            path = folder / f"{case}_{stage}{suffix}"
            path.write_bytes(content)
            files[case, stage] = path, content
    return files


def run_reader(reader: str, data: Path, output: Path, model: Path, *extra: str) -> int:
    """`kochat-trl data convert` or the stage's recipe (in-process) on `data`, writing to `output`."""
    stage, recipe = READERS[reader]
    if recipe is None:
        return cli_main(["data", "convert", "--stage", stage, str(data), "-o", str(output), *extra])
    module, config = recipe
    data_flag = "--prompts_dataset" if reader == "dpo-prompts" else "--dataset_name"
    arguments = ["--model_name_or_path", str(model), "--init_tiny", "false", "--output_dir", str(output)]
    if module in ("ppo", "rl", "dpo"):
        arguments += ["--reward_model_path", str(model)]
    return recipe_exit(module, TINY_CONFIGS / config, *arguments, data_flag, str(data), *extra)


@pytest.mark.parametrize(("case", "reader"), MATRIX, ids=[f"{case}-{reader}" for case, reader in MATRIX])
def test_bad_data_is_one_line_exit_2_nothing_written(case, reader, bad_files, tmp_path, capsys, no_model_loads):
    stage = READERS[reader][0]
    data, content = bad_files[case, stage]
    output = tmp_path / ("rows.jsonl" if reader.startswith("convert") else "run")

    code = run_reader(reader, data, output, no_model_loads)

    prefix = "kochat-trl: error:" if reader.startswith("convert") else "error:"
    expected = f"{prefix} {data}: {CASES[case][2](stage, content)}"
    assert (code, capsys.readouterr().err.splitlines()) == (2, [expected])
    assert not output.exists()


@pytest.mark.parametrize("reader", ["convert-sft", "sft", "dpo-prompts"])
def test_refusal_leaves_an_existing_output_unchanged(reader, bad_files, tmp_path, no_model_loads):
    """With --overwrite the old output is kept: the data is read before anything is replaced or deleted."""
    stage = READERS[reader][0]
    data, _ = bad_files["nul_escaped", stage]
    convert = reader.startswith("convert")
    output = tmp_path / ("rows.jsonl" if convert else "run")
    old = output if convert else output / "old.txt"
    old.parent.mkdir(exist_ok=True)
    old.write_text("old", encoding="utf-8")

    code = run_reader(reader, data, output, no_model_loads, "--overwrite" if convert else "--overwrite=true")

    assert code == 2
    assert sorted(path.name for path in output.parent.iterdir()) == [output.name]
    assert old.read_text(encoding="utf-8") == "old"


@pytest.mark.parametrize("reader", [reader for reader, (_, recipe) in READERS.items() if recipe])
def test_good_data_is_read_before_any_model_loads(reader, bad_files, tmp_path, no_model_loads):
    """The same readers accept valid files and only then load a tokenizer or model: the refusals above come before
    any load, let alone training."""
    stage = READERS[reader][0]
    data = tmp_path / "good.jsonl"
    data.write_bytes(json_lines(records(stage, 80)))  # enough prompts for PPO's rollout batch of 32
    output = tmp_path / "run"
    with pytest.raises(ModelLoaded):
        run_reader(reader, data, output, no_model_loads)
    assert not output.exists()
