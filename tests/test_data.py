"""Korean data layouts: exact counts and contents, NFC, ties, duplicates, real KoChatGPT files."""

from __future__ import annotations

import json
import unicodedata

import pytest
from conftest import write_json, write_jsonl

from kochat_trl.cli import main
from kochat_trl.data.layouts import load_stage_data, to_dataset_dict
from kochat_trl.data.readers import read_records


def test_sft_json_array_with_bom(tmp_path):
    path = write_json(
        tmp_path / "sft.jsonl",  # KoChatGPT's .jsonl files are JSON arrays
        [
            {"prompt": " 김치는 무엇인가요? ", "completion": "김치는 발효 음식입니다.", "tokens": 12},
            {"prompt": "서울은 어디인가요?", "completion": "서울은 한국의 수도입니다."},
        ],
        bom=True,
    )
    loaded = load_stage_data(path, "sft")
    assert loaded.layout == "sft"
    assert loaded.rows == [
        {"prompt": "김치는 무엇인가요?", "completion": "김치는 발효 음식입니다."},
        {"prompt": "서울은 어디인가요?", "completion": "서울은 한국의 수도입니다."},
    ]


def test_nfc_normalisation_of_decomposed_hangul(tmp_path):
    decomposed = unicodedata.normalize("NFD", "한국어 질문")
    assert decomposed != "한국어 질문"
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": decomposed}, {"prompt": "한국어 질문"}])
    loaded = load_stage_data(path, "ppo")
    assert loaded.rows == [{"prompt": "한국어 질문"}]
    assert loaded.dropped == {"empty": 0, "duplicate": 1, "tie": 0}


def test_rm_rankings_expand_to_every_pair_in_rank_order(tmp_path):
    record = {"prompt": "질문", "completion_0": "B", "completion_1": "A", "completion_2": "C", "ranking": [1, 0, 2]}
    loaded = load_stage_data(write_jsonl(tmp_path / "rm.jsonl", [record]), "rm")
    assert loaded.rows == [
        {"prompt": "질문", "chosen": "A", "rejected": "B"},
        {"prompt": "질문", "chosen": "B", "rejected": "C"},
        {"prompt": "질문", "chosen": "A", "rejected": "C"},
    ]
    assert (loaded.read, loaded.candidates, loaded.kept) == (1, 3, 3)


def test_rm_ties_are_skipped_and_counted_for_any_n(tmp_path):
    record = {"prompt": "질문", **{f"completion_{i}": f"답{i}" for i in range(4)}, "ranking": [0, 1, 1, 2]}
    loaded = load_stage_data(write_jsonl(tmp_path / "rm.jsonl", [record]), "rm")
    assert loaded.candidates == 6  # C(4, 2)
    assert loaded.dropped["tie"] == 1
    assert {(row["chosen"], row["rejected"]) for row in loaded.rows} == {
        ("답0", "답1"),
        ("답0", "답2"),
        ("답0", "답3"),
        ("답1", "답3"),
        ("답2", "답3"),
    }


def test_empty_and_duplicate_rows_are_dropped_and_counted(tmp_path):
    rows = [
        {"prompt": "질문1", "completion": "답1"},
        {"prompt": "질문1", "completion": "답1"},
        {"prompt": "   ", "completion": "답2"},
        {"prompt": "질문3", "completion": ""},
        {"prompt": "질문4", "completion": "답4"},
    ]
    loaded = load_stage_data(write_jsonl(tmp_path / "sft.jsonl", rows), "sft")
    assert [row["prompt"] for row in loaded.rows] == ["질문1", "질문4"]
    assert loaded.dropped == {"empty": 2, "duplicate": 1, "tie": 0}
    assert (loaded.read, loaded.kept) == (5, 2)


def test_alpaca_kullm_instruction_input_output(tmp_path):
    rows = [
        {"instruction": "요약하세요.", "input": "긴 글입니다.", "output": "짧은 글입니다."},
        {"instruction": "인사하세요.", "input": "", "output": "안녕하세요."},
    ]
    loaded = load_stage_data(write_json(tmp_path / "alpaca.json", rows), "sft")
    assert loaded.layout == "alpaca"
    assert loaded.rows == [
        {"prompt": "요약하세요.\n\n긴 글입니다.", "completion": "짧은 글입니다."},
        {"prompt": "인사하세요.", "completion": "안녕하세요."},
    ]


def test_paired_and_messages_layouts(tmp_path):
    pairs = load_stage_data(
        write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "질문", "chosen": "좋은 답", "rejected": "나쁜 답"}]), "rm"
    )
    assert pairs.layout == "pairs" and pairs.rows == [{"prompt": "질문", "chosen": "좋은 답", "rejected": "나쁜 답"}]
    messages = [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "안녕하세요."}]
    loaded = load_stage_data(write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}]), "sft")
    assert loaded.layout == "messages" and loaded.rows == [{"messages": messages}]
    assert load_stage_data(tmp_path / "m.jsonl", "ppo").rows == [{"prompt": "안녕?"}]


def test_conversation_text_multi_turn(tmp_path):
    path = tmp_path / "conv.jsonl"
    path.write_text(
        "\n<<start conversation>>\n<사람>: 안녕하세요\n<챗봇>: 반갑습니다.\n<사람>: 날씨 어때요?\n<챗봇>: 맑습니다.\n"
        "이어지는 줄입니다.\n\n<<start conversation>>\n<사람>: 질문\n<챗봇>: 답변\n<사람>: 남은 질문\n",
        encoding="utf-8",
    )
    loaded = load_stage_data(path, "sft")
    assert loaded.layout == "conversation"
    assert loaded.rows == [
        {
            "messages": [
                {"role": "user", "content": "안녕하세요"},
                {"role": "assistant", "content": "반갑습니다."},
                {"role": "user", "content": "날씨 어때요?"},
                {"role": "assistant", "content": "맑습니다.\n이어지는 줄입니다."},
            ]
        },
        {"messages": [{"role": "user", "content": "질문"}, {"role": "assistant", "content": "답변"}]},
    ]


def test_rm_and_sft_files_feed_ppo_prompts(tmp_path):
    record = {"prompt": "질문", "completion_0": "가", "completion_1": "나", "ranking": [0, 1]}
    assert load_stage_data(write_jsonl(tmp_path / "rm.jsonl", [record]), "ppo").rows == [{"prompt": "질문"}]


def test_split_is_deterministic_by_seed():
    rows = [{"prompt": f"질문{i}"} for i in range(50)]
    first, again, other = (to_dataset_dict(rows, 0.2, seed) for seed in (1, 1, 2))
    assert len(first["eval"]) == 10 and len(first["train"]) == 40
    assert first["eval"]["prompt"] == again["eval"]["prompt"]
    assert first["eval"]["prompt"] != other["eval"]["prompt"]
    assert set(first["eval"]["prompt"]).isdisjoint(first["train"]["prompt"])


def test_convert_cli_writes_trl_ready_jsonl(tmp_path, capsys):
    record = {"prompt": "질문", "completion_0": "가", "completion_1": "나", "completion_2": "다", "ranking": [0, 1, 1]}
    source = write_json(tmp_path / "rm.json", [record])
    output = tmp_path / "out" / "rm.jsonl"
    assert main(["data", "convert", "--stage", "rm", str(source), "-o", str(output)]) == 0
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert rows == [
        {"prompt": "질문", "chosen": "가", "rejected": "나"},
        {"prompt": "질문", "chosen": "가", "rejected": "다"},
    ]
    out = capsys.readouterr().out
    assert "read 1 records, 3 candidate pairs; kept 2; dropped 1 (empty 0, duplicate 0, tie 1)" in out
    assert main(["data", "convert", "--stage", "rm", str(source), "-o", str(output)]) == 2  # exists, no --overwrite


def test_inspect_prints_layout_counts_and_token_percentiles(tmp_path, capsys, tiny_model_dir):
    source = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"질문 {i}", "completion": "답입니다."} for i in range(5)])
    assert main(["data", "inspect", str(source), "--tokenizer", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "layout:    sft (as sft data)" in out
    assert "kept 5" in out
    assert "tokens prompt" in out and "tokens completion" in out


# --- bad input: one line naming the place and the problem, exit 2, nothing written -----------------

RM_OK = {"prompt": "질문", "completion_0": "가", "completion_1": "나", "ranking": [0, 1]}

BAD_INPUTS = [
    (
        "malformed_jsonl",
        "jsonl",
        '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n',
        "ppo",
        ["line 3", "invalid JSON"],
    ),
    ("malformed_array", "json", '[\n {"prompt": "a"},\n {"prompt": }\n]', "ppo", ["line 3", "invalid JSON"]),
    (
        "missing_key_array",
        "json",
        [{"prompt": "a", "completion": "b"}, {"prompt": "c"}],
        "sft",
        ["record 1", "missing key 'completion'"],
    ),
    (
        "missing_key_jsonl",
        "jsonl",
        [{"prompt": "a", "completion": "b"}, {"completion": "c"}],
        "sft",
        ["line 2", "missing key 'prompt'"],
    ),
    ("wrong_type", "jsonl", [{"prompt": ["a"]}], "ppo", ["line 1", "'prompt' must be a string"]),
    ("ranking_length", "json", [RM_OK, {**RM_OK, "ranking": [0, 1, 2]}], "rm", ["record 1", "bad ranking"]),
    ("ranking_range", "json", [{**RM_OK, "ranking": [0, 5]}], "rm", ["record 0", "bad ranking"]),
    ("ranking_type", "json", [{**RM_OK, "ranking": ["0", "1"]}], "rm", ["record 0", "bad ranking"]),
    (
        "ranking_missing",
        "json",
        [{k: v for k, v in RM_OK.items() if k != "ranking"}],
        "rm",
        ["record 0", "missing key 'ranking'"],
    ),
    (
        "one_completion",
        "json",
        [{"prompt": "a", "completion_0": "b", "ranking": [0]}],
        "rm",
        ["record 0", "completion_1"],
    ),
    ("unknown_layout", "jsonl", [{"question": "a"}], "sft", ["line 1", "unknown record layout"]),
    ("stage_mismatch", "jsonl", [{"prompt": "a"}], "sft", ["cannot feed the sft stage"]),
    ("all_empty", "jsonl", [{"prompt": " ", "completion": "b"}], "sft", ["no usable sft rows", "empty 1"]),
    ("empty_file", "jsonl", "", "ppo", ["file is empty"]),
    ("not_utf8", "jsonl", b'{"prompt": "\xb1\xe8"}\n', "ppo", ["not UTF-8"]),
    ("bad_role", "jsonl", [{"messages": [{"role": "bot", "content": "a"}]}], "sft", ["line 1", "role 'bot'"]),
    ("record_not_object", "json", [{"prompt": "a"}, "b"], "ppo", ["record 1", "expected a JSON object"]),
    ("conversation_junk", "txt", "<<start conversation>>\n<사람>: a\n<챗봇>: b\n", "rm", ["cannot feed the rm stage"]),
]


@pytest.mark.parametrize(("name", "suffix", "content", "stage", "expected"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_named_and_exits_2_without_output(tmp_path, capsys, name, suffix, content, stage, expected):
    source = tmp_path / f"{name}.{suffix}"
    if isinstance(content, bytes):
        source.write_bytes(content)
    elif isinstance(content, str):
        source.write_text(content, encoding="utf-8")
    elif suffix == "json":
        write_json(source, content)
    else:
        write_jsonl(source, content)
    output = tmp_path / "out.jsonl"
    assert main(["data", "convert", "--stage", stage, str(source), "-o", str(output)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0, error
    assert str(source) in error
    for fragment in expected:
        assert fragment in error
    assert not output.exists()
    assert list(tmp_path.iterdir()) == [source]  # no temp files either


def test_missing_file_is_named(tmp_path, capsys):
    assert main(["data", "convert", "--stage", "ppo", str(tmp_path / "none.json"), "-o", str(tmp_path / "o")]) == 2
    assert "none.json: file not found" in capsys.readouterr().err


# --- real KoChatGPT files -----------------------------------------------------------------------


def test_real_kochatgpt_ppo_file_is_a_json_array_of_12000_prompts(shared_kochatgpt):
    records, container = read_records(shared_kochatgpt / "kochatgpt_3_PPO.jsonl")
    assert container == "json_array" and len(records) == 12000
    loaded = load_stage_data(shared_kochatgpt / "kochatgpt_3_PPO.jsonl", "ppo")
    assert (loaded.read, loaded.kept, loaded.dropped) == (12000, 11945, {"empty": 3, "duplicate": 52, "tie": 0})


def test_real_kochatgpt_conversations_are_439_multi_turn_examples(shared_kochatgpt):
    loaded = load_stage_data(shared_kochatgpt / "kochatgpt_1_SFT_conversation.jsonl", "sft")
    assert loaded.layout == "conversation" and loaded.kept == 439
    assert all(len(row["messages"]) >= 2 and row["messages"][-1]["role"] == "assistant" for row in loaded.rows)
    assert sum(len(row["messages"]) > 2 for row in loaded.rows) > 400  # multi-turn


def test_real_kochatgpt_seed_file_with_bom(shared_kochatgpt):
    loaded = load_stage_data(shared_kochatgpt / "kochatgpt_seed_data.txt", "ppo")
    assert loaded.layout == "prompts"
    assert not loaded.rows[0]["prompt"].startswith("\ufeff")
    assert (loaded.read, loaded.kept) == (11997, 11945)
