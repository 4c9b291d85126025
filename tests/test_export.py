"""kochat_trl.models.export / `kochat-trl merge` on the embedded tiny default: merged logits equal adapter logits,
QLoRA adapters merge into a full-precision base, saved dtype/files/card, and bad inputs fail cleanly."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_CONFIGS, recipe_exit, run_recipe
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl import ModelConfig

from kochat_trl.cli import main
from kochat_trl.data.templates import saved_template_name
from kochat_trl.errors import KochatError
from kochat_trl.models.export import merge_adapter, push_folder_to_hub
from kochat_trl.models.loading import load_causal_lm, load_tokenizer
from kochat_trl.models.lora import build_peft_config

TEXTS = ["### Instruction(명령어):\n한국의 수도는 어디인가요?\n\n### Response(응답): 서울입니다.", "안녕하세요"]
LORA_R = 8
METRICS = {"eval_loss_end": 1.2345678, "global_step": 7}
FAKE_TOKEN = "hf_kochatFakeToken0123456789abcdef"


def lora_args(**overrides) -> ModelConfig:
    return ModelConfig(use_peft=True, lora_r=LORA_R, lora_dropout=0.0, **overrides)


def perturb_lora_b(peft_model, seed: int) -> int:
    """lora_B starts at zero (a no-op adapter); random values make the merge observable."""
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
                changed += 1
    return changed


@torch.no_grad()
def logits_of(model, batch) -> torch.Tensor:
    model.eval()
    return model(**batch).logits.float()


def max_diff(left: torch.Tensor, right: torch.Tensor) -> float:
    return (left - right).abs().max().item()


def run_cli(*args: str | Path) -> int:
    return main(["merge", *map(str, args)])


def weight_files(folder: Path) -> list[str]:
    suffixes = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"}
    return sorted(path.name for path in folder.iterdir() if path.suffix in suffixes)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("kochat-trl: error:")]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return tokenizer(TEXTS, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def causal(tiny_model_dir, tokenizer, batch, tmp_path_factory):
    """A saved causal-LM LoRA adapter (with tokenizer, metrics.json, config.yaml) and its reference numbers."""
    adapter = tmp_path_factory.mktemp("causal") / "adapter"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = logits_of(model, batch)
    peft_model = get_peft_model(model, build_peft_config(lora_args(), model, "CAUSAL_LM"))
    assert perturb_lora_b(peft_model, seed=1) == 2 * 4  # 2 layers x q/k/v/o
    peft_model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    (adapter / "metrics.json").write_text(json.dumps(METRICS))
    (adapter / "config.yaml").write_text("dataset_name: bundled:sft\ntemplate: kochatgpt_short\nload_in_4bit: false\n")
    adapter_logits = logits_of(peft_model, batch)
    merged_state = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    return SimpleNamespace(dir=adapter, base_logits=base_logits, logits=adapter_logits, merged_state=merged_state)


def test_causal_lm_merge_matches_the_adapter_and_loads_plainly(causal, tiny_model_dir, batch, tmp_path, capsys):
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"kobest_accuracy": 0.5}))
    out = tmp_path / "merged"
    assert run_cli("--adapter", causal.dir, "-o", out, "--metrics", extra) == 0
    assert f"saved to {out}" in capsys.readouterr().out

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    merged_logits = logits_of(merged, batch)
    assert max_diff(merged_logits, causal.logits) < 1e-4
    assert max_diff(merged_logits, causal.base_logits) > 1e-3  # the adapter really was applied

    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert (config["pad_token_id"], generation["pad_token_id"], generation["eos_token_id"]) == (0, 0, 2)
    assert config["dtype"] == "float32" and "quantization_config" not in config
    assert weight_files(out) == ["model.safetensors"]  # safetensors only, no .bin
    assert AutoTokenizer.from_pretrained(out).pad_token_id == 0
    assert not list(tmp_path.glob(".merged.tmp-*"))  # staging folder renamed away

    card = (out / "README.md").read_text(encoding="utf-8")
    for expected in (
        str(tiny_model_dir),
        str(causal.dir),
        "bundled:sft",
        "SFT",
        "float32",
        "| eval_loss_end | 1.2346 |",
        "| global_step | 7 |",
        "| kobest_accuracy | 0.5000 |",
        "AutoModelForCausalLM.from_pretrained",
        "### Instruction(명령어):",
        "기반 모델",
    ):
        assert expected in card, expected
    assert "base_model:" not in card  # a local path is no hub id: the hub would reject the card
    info = json.loads((out / "kochat_merge.json").read_text())
    assert (info["base_model"], info["task_type"], info["metrics"]) == (str(tiny_model_dir), "CAUSAL_LM", METRICS)
    # The card shows how to format with the chat template the merged tokenizer carries (and what it renders).
    assert info["template"] == "kochatgpt_short"
    assert "tokenizer.apply_chat_template(messages, add_generation_prompt=True" in card
    assert 'pipeline("text-generation", model=path)' in card
    assert "### Instruction(명령어):\n한국의 수도는 어디인가요?\n\n### Response(응답):\n```" in card
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(causal.dir).chat_template


def test_an_adapter_saved_without_a_chat_template_gets_the_one_its_run_recorded(causal, tmp_path):
    """Runs saved before tokenizers carried the template still export one: the template named in config.yaml."""
    old = tmp_path / "old-run"
    shutil.copytree(causal.dir, old)
    (old / "chat_template.jinja").unlink()
    config = json.loads((old / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (old / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(old).chat_template is None
    out = merge_adapter(old, tmp_path / "merged")
    assert saved_template_name(AutoTokenizer.from_pretrained(out)) == "kochatgpt_short"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_saved_dtype_is_the_one_asked_for(causal, tmp_path, dtype):
    name = str(dtype).removeprefix("torch.")
    out = merge_adapter(causal.dir, tmp_path / "merged", dtype=name)
    with safe_open(str(out / "model.safetensors"), framework="pt") as tensors:
        saved = {key: tensors.get_tensor(key) for key in tensors.keys()}
    assert len(saved) == len(causal.merged_state)
    assert {tensor.dtype for tensor in saved.values()} == {dtype}
    # Merged, then rounded once: each weight equals the float32 merge to within a rounding step or two.
    assert max(max_diff(saved[key].float(), causal.merged_state[key]) for key in saved) < 2e-3
    assert json.loads((out / "config.json").read_text())["dtype"] == name
    assert AutoModelForCausalLM.from_pretrained(out).dtype == dtype
    assert f"dtype=torch.{name}" in (out / "README.md").read_text(encoding="utf-8")


def test_reward_model_merge_keeps_the_trained_score_head(tiny_model_dir, batch, tmp_path):
    adapter = tmp_path / "rm-adapter"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    peft_model = get_peft_model(model, build_peft_config(lora_args(), model, "SEQ_CLS"))
    perturb_lora_b(peft_model, seed=2)
    with torch.no_grad():  # the trained copy of the head (modules_to_save) must differ from the base's
        peft_model.base_model.model.score.modules_to_save["default"].weight.add_(0.1)
    peft_model.save_pretrained(adapter)  # no tokenizer beside it: the base's is used
    scores = logits_of(peft_model, batch)
    with peft_model.disable_adapter():
        base_scores = logits_of(peft_model, batch)

    out = tmp_path / "merged-rm"
    assert run_cli("--adapter", adapter, "-o", out) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == 0
    merged_scores = logits_of(merged, batch)
    assert merged_scores.shape == (2, 1)
    assert max_diff(merged_scores, scores) < 1e-4
    assert max_diff(merged_scores, base_scores) > 1e-3
    assert weight_files(out) == ["model.safetensors"]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "reward model (RM)" in card and "AutoModelForSequenceClassification" in card
    assert 'tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)' in card
    assert "### Response(응답): 한국의 수도는 서울입니다.</s>" in card  # the scored conversation ends with eos


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_adapter_trained_on_a_kbit_base_merges_into_full_precision(tiny_model_dir, batch, tmp_path, bits):
    """One LoRA step on a bitsandbytes 4-bit (nf4) or 8-bit (LLM.int8) base on CPU, then `kochat-trl merge`: the
    merged model is the full-precision base + that adapter, with no quantized module or parameter left."""
    bnb = pytest.importorskip("bitsandbytes")
    quantized_linear = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}[bits]
    torch.manual_seed(0)
    model_args = lora_args(model_name_or_path=str(tiny_model_dir), **{f"load_in_{bits}": True})
    quantized = load_causal_lm(model_args, load_tokenizer(model_args))
    assert sum(isinstance(module, quantized_linear) for module in quantized.modules()) == 2 * 7
    peft_model = get_peft_model(quantized, build_peft_config(model_args, quantized, "CAUSAL_LM"))
    trainable = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    peft_model.train()
    peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    # lora_B starts at zero, so only its gradients are non-zero on the first step: they must reach every adapter.
    lora_b = [parameter for name, parameter in peft_model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 2 * 4 and all(parameter.grad.abs().sum() > 0 for parameter in lora_b)
    optimizer.step()  # one (Q)LoRA step: lora_B leaves zero
    adapter = tmp_path / f"{bits}-adapter"
    peft_model.save_pretrained(adapter)
    (adapter / "config.yaml").write_text(f"load_in_{bits}: true\n")
    del peft_model, quantized

    out = tmp_path / f"merged-{bits}"
    assert run_cli("--adapter", adapter, "-o", out) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) for module in merged.modules())
    assert {type(parameter).__name__ for parameter in merged.parameters()} == {"Parameter"}  # no Params4bit/Int8Params
    assert {parameter.dtype for parameter in merged.parameters()} == {torch.float32}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    full_precision = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = logits_of(full_precision, batch)
    reference = logits_of(PeftModel.from_pretrained(full_precision, adapter), batch)
    merged_logits = logits_of(merged, batch)
    assert max_diff(merged_logits, reference) < 1e-4
    assert max_diff(merged_logits, base_logits) > 1e-3
    assert f"{bits} base (QLoRA)" in (out / "README.md").read_text(encoding="utf-8")


def test_tokens_added_in_training_resize_the_merged_model(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base_vocab = len(tokenizer)
    assert tokenizer.add_tokens(["<새토큰>"]) == 1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    peft_model = get_peft_model(model, build_peft_config(lora_args(), model, "CAUSAL_LM"))
    perturb_lora_b(peft_model, seed=3)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)  # peft saves the resized embeddings with the adapter
    tokenizer.save_pretrained(adapter)
    batch = {"input_ids": torch.tensor([[5, 6, base_vocab, 7]])}

    out = merge_adapter(adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.get_input_embeddings().weight.shape[0] == base_vocab + 1
    assert merged.config.vocab_size == base_vocab + 1
    assert max_diff(logits_of(merged, batch), logits_of(peft_model, batch)) < 1e-4
    assert len(AutoTokenizer.from_pretrained(out)) == base_vocab + 1


# --- bad inputs ------------------------------------------------------------------------------------------


def test_missing_adapter_folder(tmp_path, capsys):
    assert run_cli("--adapter", tmp_path / "nope", "-o", tmp_path / "out") == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "nope: adapter folder not found" in line
    assert sorted(tmp_path.iterdir()) == []


def test_non_adapter_folder(tiny_model_dir, tmp_path, capsys):
    assert run_cli("--adapter", tiny_model_dir, "-o", tmp_path / "out") == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"{tiny_model_dir}: not a PEFT adapter folder (no adapter_config.json)" in line
    assert sorted(tmp_path.iterdir()) == []


def test_missing_base_names_the_fix(causal, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = json.loads((causal.dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone" / "base")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert run_cli("--adapter", adapter, "-o", tmp_path / "out") == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "gone/base" in line and "pass --base PATH" in line
    assert not (tmp_path / "out").exists()


def test_an_adapter_as_base_must_be_merged_first(causal, tmp_path, capsys):
    assert run_cli("--adapter", causal.dir, "--base", causal.dir, "-o", tmp_path / "out") == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"{causal.dir}: the base is itself a LoRA adapter; merge it first" in line
    assert not (tmp_path / "out").exists()


def test_non_empty_output_is_refused_without_overwrite(causal, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli("--adapter", causal.dir, "-o", out) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "output folder is not empty" in line and "--overwrite" in line
    assert [path.name for path in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]

    assert run_cli("--adapter", causal.dir, "-o", out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and weight_files(out) == ["model.safetensors"]


# --- push to hub (unreachable here) ---------------------------------------------------------------------


def test_failed_push_is_one_clear_error_and_never_leaks_the_token(causal, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: fails at once
    out = tmp_path / "merged"
    assert run_cli("--adapter", causal.dir, "-o", out, "--push-to-hub", "someone/kochat-tiny") == 2
    captured = capsys.readouterr()
    (line,) = error_lines(captured.err)
    assert "push to the hub repo someone/kochat-tiny failed" in line and f"saved at {out}" in line
    assert FAKE_TOKEN not in captured.out + captured.err
    assert weight_files(out) == ["model.safetensors"]  # the merge itself is kept
    for path in out.iterdir():
        text = path.read_bytes().decode("utf-8", errors="ignore")
        assert FAKE_TOKEN not in text and "HF_TOKEN" not in text, path.name


def test_push_errors_are_scrubbed_of_the_token(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    def refuse(*args, **kwargs):
        raise RuntimeError(f"401 Unauthorized for Authorization: Bearer {FAKE_TOKEN}\nmore detail")

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(KochatError) as caught:
        push_folder_to_hub(tmp_path, "someone/kochat-tiny")
    message = str(caught.value)
    assert FAKE_TOKEN not in message and "Bearer ***" in message
    assert "\n" not in message and caught.value.__cause__ is None


def test_lora_on_a_lora_adapter_folder_is_refused_before_any_model_loads(tiny_model_dir, tmp_path, capsys):
    """A LoRA stage on an SFT *adapter* folder trains on base + SFT merged in memory, but PEFT would record the raw
    base as `base_model_name_or_path`, and every later merge would build another model. Refused at once instead."""
    sft = tmp_path / "sft-lora"
    brief = ["--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no", "--max_samples", "64"]
    run_recipe(
        "sft",
        "sft.yaml",
        "--model_name_or_path",
        str(tiny_model_dir),
        "--init_tiny",
        "false",
        "--use_peft",
        "true",
        "--output_dir",
        str(sft),
        *brief,
    )
    capsys.readouterr()
    # PPO's policy adapter would merge silently into the raw base; stage 2 crashed loading the SFT adapter.
    cases = [
        ("reward", "reward.yaml", []),
        ("sft", "sft.yaml", []),
        ("ppo", "ppo.yaml", ["--reward_model_path", str(sft)]),
    ]
    for recipe, config, extra in cases:
        out = tmp_path / recipe
        code = recipe_exit(
            recipe,
            TINY_CONFIGS / config,
            "--model_name_or_path",
            str(sft),
            "--init_tiny",
            "false",
            "--use_peft",
            "true",
            "--output_dir",
            str(out),
            *extra,
        )
        lines = capsys.readouterr().err.splitlines()
        assert code == 2 and len(lines) == 1, lines
        assert f"{sft} is a LoRA adapter folder" in lines[0] and f"kochat-trl merge --adapter {sft}" in lines[0]
        assert not out.exists()
