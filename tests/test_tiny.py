"""The embedded default: bundled data sizes, deterministic build, pad != eos, loads by path."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kochat_trl.cli import main
from kochat_trl.data import bundled_data_path, load_stage_data
from kochat_trl.templates import get_template
from kochat_trl.tiny import init_tiny


def test_bundled_data_sizes_and_layouts():
    sft, rm, ppo = (load_stage_data(f"bundled:{stage}", stage) for stage in ("sft", "rm", "ppo"))
    assert (sft.layout, sft.kept, sft.dropped) == ("sft", 340, {"empty": 0, "duplicate": 0, "tie": 0})
    # 3 ranked completions -> C(3, 2) pairs each, minus the tied pairs (equal ranks carry no preference)
    assert (rm.layout, rm.read, rm.candidates, rm.dropped["tie"], rm.kept) == ("rm", 200, 600, 19, 581)
    assert (ppo.layout, ppo.kept) == ("ppo", 300)
    records = json.loads(bundled_data_path("rm").read_text(encoding="utf-8"))
    assert all(record["ranking"].count(0) == 1 and set(record["ranking"]) <= {0, 1, 2} for record in records)
    best = [record[f"completion_{record['ranking'].index(0)}"] for record in records]
    assert all(answer.endswith("니다.") for answer in best)  # best answers are polite and complete
    assert all(row["completion"].endswith("니다.") for row in sft.rows)


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
    assert len(tokenizer) == model.config.vocab_size == 1024

    # The template markers and Korean text round-trip and compress (BPE learned Korean syllables).
    text = get_template("kochatgpt_short").format_prompt("김치에 대해 알려 주세요.") + " 김치는 한국의 발효 음식입니다."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")) / 2
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 1024)


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
