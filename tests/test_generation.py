"""Decoding presets, batched generation, metrics, compare-decoding and chat on the embedded tiny default.

The tiny model is untrained (random weights): its answers are noise, but decoding mechanics (left
padding, seeding, n-gram blocking, eos cutting, templates, scoring) are exact and checked exactly.
"""

from __future__ import annotations

import io
import re

import pytest
import torch
from conftest import plain_reward

from kochat_trl.cli import main
from kochat_trl.eval import decoding
from kochat_trl.eval.chat import chat_loop
from kochat_trl.eval.decoding import decoding_metrics, distinct_n, render_markdown, repeated_ngram_rate
from kochat_trl.eval.generation import (
    DECODING_PRESETS,
    Generation,
    Generator,
    decoding_kwargs,
    parse_generate_overrides,
)
from kochat_trl.eval.judge import JUDGE_KEYS

PROMPTS = ["안녕하세요", "화성은 무엇인가요? 태양계에서 몇 번째 행성인지 자세히 설명해 주세요."]
MORE_PROMPTS = ["김치는 무엇인가요?", "서울을 소개해 주세요.", "고양이에 대해 알려 주세요.", "비는 왜 내리나요?"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def generator(tiny_model_dir) -> Generator:
    return Generator.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def texts(generator) -> list[str]:
    return [generator.format(prompt) for prompt in PROMPTS]


def bigrams(ids: list[int]) -> list[tuple[int, int]]:
    return list(zip(ids, ids[1:], strict=False))


def test_loader_uses_the_saved_chat_template_and_left_padding(generator, texts):
    assert generator.template_name == "kochatgpt_short"  # the chat template init-tiny saved with the tokenizer
    assert texts[0] == "### Instruction(명령어):\n안녕하세요\n\n### Response(응답):"
    batch = generator.tokenizer(texts, padding=True, return_tensors="pt")
    short = len(generator.tokenizer(texts[0])["input_ids"])
    padding = batch["input_ids"].shape[1] - short
    assert padding > 0
    assert batch["input_ids"][0, :padding].tolist() == [generator.tokenizer.pad_token_id] * padding
    assert batch["attention_mask"][0].tolist() == [0] * padding + [1] * short


@pytest.mark.parametrize("strategy", list(DECODING_PRESETS))
def test_each_preset_answers_a_padded_batch(generator, texts, strategy):
    result = generator.generate(texts, strategy, max_new_tokens=NEW_TOKENS, seed=0)
    assert len(result.answers) == 2
    assert all(answer.strip() for answer in result.answers)
    assert all(0 < count <= NEW_TOKENS for count in result.token_counts)
    for ids, answer in zip(result.token_ids, result.answers, strict=True):
        assert generator.tokenizer.decode(ids, skip_special_tokens=True).strip() == answer


def test_greedy_batch_equals_one_prompt_at_a_time(generator, texts):
    batched = generator.generate(texts, "greedy", max_new_tokens=NEW_TOKENS)
    for index, text in enumerate(texts):
        alone = generator.generate([text], "greedy", max_new_tokens=NEW_TOKENS)
        assert alone.token_ids[0] == batched.token_ids[index]
        assert alone.answers[0] == batched.answers[index]


def test_greedy_is_deterministic_and_sampling_follows_the_seed(generator):
    texts = [generator.format(prompt) for prompt in MORE_PROMPTS]
    assert generator.generate(texts, "greedy", max_new_tokens=8).token_ids == (
        generator.generate(texts, "greedy", max_new_tokens=8).token_ids
    )
    first = generator.generate(texts, "sampling", max_new_tokens=8, seed=1).token_ids
    again = generator.generate(texts, "sampling", max_new_tokens=8, seed=1).token_ids
    other = generator.generate(texts, "sampling", max_new_tokens=8, seed=2).token_ids
    assert first == again
    assert sum(a != b for a, b in zip(first, other, strict=True)) >= 1


def test_beam_never_repeats_a_token_bigram(generator, texts):
    long = 40
    beam = generator.generate(texts, "beam", max_new_tokens=long)
    for ids in beam.token_ids:
        assert len(ids) > 10
        assert len(set(bigrams(ids))) == len(bigrams(ids))
    # The check can fail: without the n-gram block, the random model loops.
    greedy = generator.generate(texts, "greedy", max_new_tokens=long)
    assert any(len(set(bigrams(ids))) < len(bigrams(ids)) for ids in greedy.token_ids)


def test_answers_stop_at_eos_and_count_it(generator, texts):
    free = generator.generate(texts[:1], "greedy", max_new_tokens=NEW_TOKENS)
    assert free.generated_tokens == free.token_counts[0] == NEW_TOKENS  # no eos: every new token kept
    stop = free.token_ids[0][5]  # pretend this token is eos: generation must stop right before it
    cut = free.token_ids[0].index(stop)
    stopped = generator.generate(texts[:1], "greedy", {"eos_token_id": stop}, max_new_tokens=NEW_TOKENS)
    assert stopped.token_ids[0] == free.token_ids[0][:cut]
    assert stopped.generated_tokens == cut + 1  # the eos was generated too


def test_metrics_on_a_hand_made_example():
    answers = ["a b a b", "c d e", ""]
    # unigrams a b a b c d e: 5 unique of 7; bigrams ab ba ab cd de: 4 unique of 5
    assert distinct_n(answers, 1) == pytest.approx(5 / 7)
    assert distinct_n(answers, 2) == pytest.approx(4 / 5)
    # answer 1: 3 bigrams, "a b" seen again -> 1/3; answer 2: 0; answer 3 has no bigram (skipped)
    assert repeated_ngram_rate(answers, 2) == pytest.approx(1 / 6)
    assert repeated_ngram_rate(answers, 1) == pytest.approx((2 / 4 + 0) / 2)
    generated = Generation(answers, [[5, 6, 5, 6], [7, 8, 9], []], generated_tokens=10, seconds=2.0)
    metrics = decoding_metrics(generated, rewards=[1.0, 2.0, 4.5])
    assert metrics.distinct_1 == pytest.approx(5 / 7)
    assert metrics.distinct_2 == pytest.approx(4 / 5)
    assert metrics.repeated_ngram_rate == pytest.approx(1 / 6)
    assert metrics.mean_tokens == pytest.approx(7 / 3)
    assert metrics.mean_chars == pytest.approx((7 + 5 + 0) / 3)
    assert metrics.tokens_per_second == pytest.approx(5.0)
    assert metrics.mean_reward == pytest.approx(2.5)
    assert decoding_metrics(generated).mean_reward is None
    assert distinct_n(["", " "], 1) == 0.0 and repeated_ngram_rate(["하나"], 2) == 0.0


def test_overrides_parse_as_json_and_win_over_presets():
    parsed = parse_generate_overrides(["repetition_penalty=1.2", "eos_token_id=[2, 5]", "cache_implementation=static"])
    assert parsed == {"repetition_penalty": 1.2, "eos_token_id": [2, 5], "cache_implementation": "static"}
    kwargs = decoding_kwargs("top_p", {"top_p": 0.5, "repetition_penalty": 1.2}, max_new_tokens=7)
    assert kwargs == {**DECODING_PRESETS["top_p"], "top_p": 0.5, "repetition_penalty": 1.2, "max_new_tokens": 7}
    assert decoding_kwargs("greedy", {"max_length": 30})["max_new_tokens"] is None


def test_adapter_folder_is_applied(tiny_model_dir, generator, texts, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # non-zero: changes logits
    peft_model = get_peft_model(base, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    adapted = Generator.load(str(tiny_model_dir), adapter=str(tmp_path / "adapter"))
    batch = generator.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = peft_model(**batch).logits
        got = adapted.model(**batch).logits
        plain = generator.model(**batch).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert (got - plain).abs().max() > 0.1


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    path = tmp_path_factory.mktemp("rm") / "rm"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def summary_rows(markdown: str) -> dict[str, list[str]]:
    section = markdown.split("## Summary", 1)[1].split("\n\n")[1]
    rows = [line.strip("|").split("|") for line in section.splitlines()[2:]]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}


def test_compare_decoding_cli_writes_what_it_computed(tiny_model_dir, reward_dir, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    captured = []
    real = decoding.compare_decoding
    monkeypatch.setattr(decoding, "compare_decoding", lambda *a, **k: captured.append(real(*a, **k)) or captured[-1])
    output = tmp_path / "decoding.md"
    args = [
        "compare-decoding",
        "--model",
        str(tiny_model_dir),
        "--reward-model",
        str(reward_dir),
        "--strategies",
        "greedy,beam,top_p",
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--output",
        str(output),
    ]
    assert main(args) == 0
    (result,) = captured
    printed = capsys.readouterr().out
    markdown = output.read_text(encoding="utf-8")
    assert markdown == render_markdown(result)

    assert result.prompts == decoding.default_prompts() and len(result.prompts) == 4
    assert [item.strategy for item in result.results] == ["greedy", "beam", "top_p"]
    rows = summary_rows(markdown)
    assert list(rows) == ["greedy", "beam", "top_p"]
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    for item in result.results:
        metrics = item.metrics
        expected = [
            metrics.mean_reward,
            metrics.distinct_1,
            metrics.distinct_2,
            metrics.repeated_ngram_rate,
            metrics.mean_tokens,
            metrics.mean_chars,
            metrics.tokens_per_second,
        ]
        assert [float(cell) for cell in rows[item.strategy][:7]] == pytest.approx(expected, abs=0.051)
        assert float(rows[item.strategy][1]) == round(metrics.distinct_1, 4)
        assert float(rows[item.strategy][0]) == round(metrics.mean_reward, 4)
        # The mean reward is the plain sequence classifier's score of the (prompt, answer) chat, with transformers only.
        scores = [
            plain_reward(reward_model, tokenizer, prompt, answer)
            for prompt, answer in zip(result.prompts, item.answers, strict=True)
        ]
        assert metrics.mean_reward == pytest.approx(sum(scores) / 4, abs=1e-5)
        judge = rows[item.strategy][7:]  # good, polite, on-topic, faithful, broken, hangul, repeats
        assert judge == [f"{metrics.judge[key]:.2f}" for key in JUDGE_KEYS]
        assert metrics.distinct_1 == distinct_n(item.answers, 1)
        for answer in item.answers:
            cell = answer.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")
            assert f"| {item.strategy} | {cell} |" in markdown
        assert item.strategy in printed
    assert f"wrote {output}" in printed
    # Every row has a cell per column and the judge's columns are named for what they hold (they once said
    # broken/hangul/polite/on-topic/repeats over good/polite/on_topic/faithful/broken/hangul/repeat's values).
    header = markdown.split("## Summary", 1)[1].split("\n\n")[1].splitlines()[0]
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    judged = ("good", "polite", "on-topic", "faithful", "broken", "hangul", "repeats")
    assert columns[8:] == [f"judge: {name}" for name in judged]
    assert all(len(cells) == len(columns) - 1 for cells in rows.values())

    # An existing output is refused without --overwrite, and left as it was.
    assert main(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert output.read_text(encoding="utf-8") == markdown


def scripted_chat(generator, script: str):
    """Run the chat loop on a script; returns (answers, [(prompt the model saw, strategy)], output text)."""
    seen = []
    real = generator.generate

    def spy(texts, strategy="greedy", *args, **kwargs):
        seen.append((texts[0], strategy))
        return real(texts, strategy, *args, **kwargs)

    output = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generator, "generate", spy)
        count = chat_loop(generator, io.StringIO(script), output, max_new_tokens=6)
    return count, seen, output.getvalue()


def chat_text(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_chat_keeps_history_switches_strategy_and_resets(generator):
    tokenizer = generator.tokenizer
    script = "안녕하세요\n/strategy beam\n질문\n/reset\n/exit\n이건 읽히지 않음\n"
    count, seen, out = scripted_chat(generator, script)
    assert count == 2 and len(seen) == 2
    first_answer = generator.generate([seen[0][0]], "greedy", max_new_tokens=6).answers[0]
    assert seen[0] == (chat_text(tokenizer, [{"role": "user", "content": "안녕하세요"}]), "greedy")
    history = [
        {"role": "user", "content": "안녕하세요"},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "질문"},
    ]
    assert seen[1] == (chat_text(tokenizer, history), "beam")
    assert f"{first_answer}</s>\n\n### Instruction(명령어):\n질문" in seen[1][0]  # an earlier answer ends with eos
    assert first_answer in out and "(strategy: beam)" in out and "(history cleared)" in out

    # After /reset the model sees only the new turn; unknown strategies are named with the presets.
    count, seen, out = scripted_chat(generator, "하나\n/reset\n둘\n/strategy nucleus\n")
    assert count == 2  # EOF ends the loop like /exit
    assert seen[1] == (chat_text(tokenizer, [{"role": "user", "content": "둘"}]), "greedy")
    assert "unknown strategy 'nucleus'; presets: greedy, beam, sampling, top_k, top_p" in out


def test_chat_drops_oldest_turns_beyond_the_context(generator, monkeypatch):
    assert generator.context_limit() == 512  # the tiny Llama's max_position_embeddings
    script = "첫 번째 질문입니다\n두 번째 질문입니다\n세 번째 질문입니다\n"
    _, roomy, _ = scripted_chat(generator, script)
    # One token short of the whole conversation at the third question: exactly the oldest turn has to go.
    limit = len(generator.tokenizer(roomy[2][0])["input_ids"]) + 6 - 1
    monkeypatch.setattr(generator, "context_limit", lambda: limit)
    count, seen, out = scripted_chat(generator, script)
    assert count == 3 and seen[:2] == roomy[:2]
    assert all(len(generator.tokenizer(prompt)["input_ids"]) + 6 <= limit for prompt, _ in seen)
    # Whole turns go, oldest first: the model still sees the second question with its whole answer.
    assert "첫 번째" not in seen[2][0] and roomy[2][0].endswith(seen[2][0].removeprefix(generator.tokenizer.bos_token))
    assert seen[2][0].startswith("### Instruction(명령어):\n두 번째 질문입니다\n\n### Response(응답): ")
    note = (
        f"(the conversation outgrew the model's context of {limit} tokens with 6 to answer in: dropped the oldest 1 "
        "turn; the model sees the last 2)"
    )
    lines = out.splitlines()
    assert out.count("(the conversation outgrew") == 1 and lines[3] == f"> {note}", out


def test_fit_history_never_cuts_a_turn_and_keeps_the_system_turn(generator, monkeypatch):
    from kochat_trl.eval.chat import fit_history

    history = [
        {"role": "system", "content": "친절하게 답하세요."},
        {"role": "user", "content": "김치에 대해 알려 주세요."},
        {"role": "assistant", "content": "김치는 한국의 발효 음식입니다."},
        {"role": "assistant", "content": "오래 익히면 신맛이 강해집니다."},  # two answers to one question
        {"role": "user", "content": "그럼 비빔밥은요?"},
    ]
    monkeypatch.setattr(generator, "context_limit", lambda: 10)  # not even the question fits
    kept = list(history)
    text, note = fit_history(generator, kept, 4)
    assert kept == [history[0], history[4]] and text == generator.format(kept)  # the whole first turn went
    assert note.endswith("dropped the oldest 1 turn; the model sees the last 1)")
    monkeypatch.setattr(generator, "context_limit", lambda: 512)
    kept = list(history)
    assert fit_history(generator, kept, 4) == (generator.format(history), None) and kept == history


def test_cli_generate_prints_the_greedy_answer(tiny_model_dir, generator, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", PROMPTS[1], "--max-new-tokens", "8"]) == 0
    expected = generator.answer(PROMPTS[1], "greedy", max_new_tokens=8)
    assert capsys.readouterr().out == expected + "\n"


def test_cli_presets_listed_in_help_match_the_library():
    from kochat_trl.cli.generate import _PRESETS

    assert _PRESETS.split(", ") == list(DECODING_PRESETS)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--strategy", "nucleus"], "unknown decoding strategy 'nucleus'; choose one of greedy, beam"),
        (["--gen", "temperature"], "--gen 'temperature': expected KEY=VALUE"),
        (["--gen", "=1"], "--gen '=1': expected KEY=VALUE"),
        (["--gen", "temprature=0.5"], "'temprature' is not a transformers GenerationConfig option"),
        (["--gen", "num_return_sequences=2"], "num_return_sequences must be 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--template", "alpaca"], "unknown prompt template 'alpaca'"),
        (["--adapter", "{tmp}"], "not a PEFT adapter folder (no adapter_config.json)"),
        (["--gen", "max_new_tokens=0"], "generate rejected the greedy settings"),
    ],
)
def test_cli_bad_inputs_exit_2_naming_the_problem(tiny_model_dir, tmp_path, capsys, extra, message):
    extra = [value.replace("{tmp}", str(tmp_path)) for value in extra]
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "안녕", *extra]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_cli_missing_paths_exit_2(tiny_model_dir, tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: model folder not found" in capsys.readouterr().err
    common = ["compare-decoding", "--model", str(tiny_model_dir)]
    assert main([*common, "--reward-model", str(tmp_path / "rm")]) == 2
    assert f"{tmp_path / 'rm'}: reward model folder not found" in capsys.readouterr().err
    assert main([*common, "--prompts", str(tmp_path / "prompts.jsonl")]) == 2
    assert re.search(r"prompts\.jsonl: file not found", capsys.readouterr().err)
    assert main([*common, "--strategies", "greedy,beams"]) == 2
    assert "unknown decoding strategy 'beams'" in capsys.readouterr().err
