"""The embedded default: bundled data sizes, deterministic build, pad != eos, loads by path."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import REPO
from transformers import AutoModelForCausalLM, AutoTokenizer

from kochat_trl.cli import main
from kochat_trl.data.layouts import load_stage_data
from kochat_trl.data.readers import bundled_data_path
from kochat_trl.models.tiny import init_tiny

TIES = 1062  # tied pairs among the 3,600 of the bundled rankings (scripts/make_sample_data.py, seed 0)


def test_bundled_data_sizes_and_layouts():
    sft, rm, ppo = (load_stage_data(f"bundled:{stage}", stage) for stage in ("sft", "rm", "ppo"))
    assert (sft.layout, sft.kept, sft.dropped) == ("messages", 850, {"empty": 0, "duplicate": 0, "tie": 0})
    # 340 single questions (85 topics SFT sees x 2 forms x 2 writers) and 255 conversations (3 opening on each of
    # those topics) of 2 and 3 turns, each answered by both writers.
    turns = [len(row["messages"]) // 2 for row in sft.rows]
    assert (turns.count(1), turns.count(2), turns.count(3)) == (340, 256, 254)
    # 4 ranked completions -> C(4, 2) pairs each, minus the tied pairs: the two other topics' answers and a third
    # answer that is also wrong in content (drifting, spliced, repeated, truncated, a fragment) share a rank.
    assert (rm.layout, rm.read, rm.candidates, rm.dropped["tie"], rm.kept) == ("rm", 600, 3600, TIES, 3600 - TIES)
    assert (ppo.layout, ppo.kept) == ("ppo", 300)
    records = json.loads(bundled_data_path("rm").read_text(encoding="utf-8"))
    assert all(record["ranking"].count(0) == 1 and set(record["ranking"]) <= {0, 1, 2} for record in records)
    best = [record[f"completion_{record['ranking'].index(0)}"] for record in records]
    assert all(answer.endswith("니다.") for answer in best)  # best answers are polite and complete
    # The demonstrations are mixed on purpose: half polite, half the same facts in 반말 (each question, and each
    # conversation, is answered by both writers), and a conversation keeps its writer's register.
    registers = [{message["content"].endswith("니다.") for message in row["messages"][1::2]} for row in sft.rows]
    assert all(len(register) == 1 for register in registers)
    assert registers.count({True}) == registers.count({False}) == 425
    curt = [row for row, register in zip(sft.rows, registers, strict=True) if register == {False}]
    assert not any("니다" in message["content"] for row in curt for message in row["messages"][1::2])


def test_init_tiny_is_deterministic_and_loads_by_path(tmp_path, tiny_model_dir):
    again = init_tiny(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    other = init_tiny(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<pad>", "</s>")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id and model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert len(tokenizer) == model.config.vocab_size == 2048

    # The saved chat template renders the training prompt; Korean text round-trips and words are whole tokens.
    question, answer = "김치에 대해 알려 주세요.", "김치는 한국의 발효 음식입니다."
    chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == f"### Instruction(명령어):\n{question}\n\n### Response(응답): {answer}</s>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[-4:] == ["의", "▁발효", "▁음식입니다.", "</s>"] and len(ids) < len(text) / 3
    # The topic is one token in the question (at a line start, before 에) and in the answer (before 는).
    assert tokens.count("▁김치") == 2
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 2048)


def test_tokenizer_spells_unseen_characters_in_bytes_and_never_splits_a_syllable(tiny_model_dir):
    """Character-level BPE with byte fallback: every Hangul syllable of the bundled data is in the vocabulary, so
    a model can only emit whole syllables; an unseen character is spelled with byte tokens and decodes exactly."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    vocab = tokenizer.get_vocab()
    assert [vocab[f"<0x{value:02X}>"] for value in (0, 255)] == [4, 259]  # after pad, bos, eos, unk
    texts = [
        json.dumps(record, ensure_ascii=False)
        for stage in ("sft", "rm", "ppo")
        for record in json.loads(bundled_data_path(stage).read_text(encoding="utf-8"))
    ]
    syllables = {char for text in texts for char in text if "가" <= char <= "힣"}
    assert len(syllables) > 500 and all(char in vocab or "▁" + char in vocab for char in syllables)
    for text in ("😀 é 漢字 ☃", "줄 바꿈\n 공백\n\n끝", "새로운 글자: 똠방각하"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text  # byte tokens are not special tokens
    assert tokenizer.convert_ids_to_tokens(tokenizer("☃", add_special_tokens=False)["input_ids"]) == [
        "<0xE2>",
        "<0x98>",
        "<0x83>",
    ]
    # Every token decodes to whole characters, except the 256 byte tokens, and only 128 of those can break one.
    broken = [token for token, index in vocab.items() if "\ufffd" in tokenizer.decode([index])]
    assert len(broken) == 128 and all(token.startswith("<0x") for token in broken)


def test_init_tiny_cli_refuses_non_empty_dir(tmp_path, capsys):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("user file")
    assert main(["init-tiny", str(target)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert main(["init-tiny", str(target), "--overwrite"]) == 0
    assert (target / "model.safetensors").is_file() and not (target / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left behind


def test_the_sample_data_generator_rebuilds_the_bundled_files_byte_for_byte(tmp_path):
    """scripts/make_sample_data.py (the rules) on scripts/topic_table.jsonl (the topics): deterministic, and what
    ships in kochat_trl/resources is exactly what it writes."""
    command = [sys.executable, str(REPO / "scripts" / "make_sample_data.py"), "--out-dir", str(tmp_path)]
    printed = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "sft: 340 of 1 turn, 256 of 2 turns, 254 of 3 turns" in printed
    for name in ("sft", "rm", "ppo", "topics", "conversations"):
        assert (tmp_path / f"{name}.json").read_bytes() == bundled_data_path(name).read_bytes(), name
