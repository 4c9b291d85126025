"""PPO on the embedded default: reward rises over the SFT policy within the KL bound; the reference
really is the SFT policy (LoRA adapter disabled)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import adapter_and_reference_logits
from transformers import AutoModelForCausalLM, AutoTokenizer

from kochat_trl.templates import saved_template_name


@pytest.fixture(scope="module")
def ppo_run(pipeline_run):
    """The shipped tiny PPO config on the tiny SFT and RM: the pipeline run's PPO stage."""
    output = pipeline_run.dir / "ppo"
    return output, json.loads((output / "metrics.json").read_text())


def paired_rate_gain(flips: dict) -> tuple[float, float]:
    """A judge rate's gain over the same paired answers and its standard error: (became - stopped) / n, from the
    counts of answers that became good and that stopped being good (the rest kept their verdict)."""
    n, up, down = flips["answers"], flips["became_good"], flips["stopped_being_good"]
    gain = (up - down) / n
    return gain, ((up + down) / n - gain**2) ** 0.5 / n**0.5


def test_ppo_raises_held_out_reward_within_kl_bound(ppo_run):
    output, metrics = ppo_run
    # 960 held-out answers (60 prompts x 16 samples), same seed before and after. The SFT policy answers half in
    # 반말, which the reward model ranks below 합니다체: PPO's gain is +1.16 +- 0.09 (13 standard errors).
    gain, error = metrics["reward_after"] - metrics["reward_before"], metrics["reward_gain_se"]
    assert 0.03 < error < 0.15 and gain > 5 * error, metrics
    # PPO raised the reward of its own rollouts: the mean score of the last third of the 60 updates over the first.
    scores = [entry["objective/scores"] for entry in json.loads((output / "log_history.json").read_text())[:60]]
    assert sum(scores[-20:]) / 20 > sum(scores[:20]) / 20, scores
    assert metrics["eval_samples_per_prompt"] == 16
    assert metrics["win_rate"] > 0.45
    assert 0 < metrics["kl"] <= metrics["kl_bound"] and metrics["kl_within_bound"] is True
    assert metrics["episodes"] == 1920 and metrics["global_step"] == 60 and metrics["eval_prompts"] == 60
    assert metrics["params"]["reference_extra"] == 0  # LoRA: the reference costs no memory
    assert 0 < metrics["params"]["policy_trainable"] < metrics["params"]["policy"]
    assert 0 < metrics["params"]["value_trainable"] < metrics["params"]["value"]
    # What a reader sees first: three changed answers to topics SFT saw, then one to a topic it never saw.
    samples = metrics["samples"]
    assert [sample["seen"] for sample in samples] == [True, True, True, False], samples
    assert all(sample["before"] != sample["after"] and sample["judge_after"]["good"] for sample in samples[:3])
    assert json.loads((output / "metrics.json").read_text()) == metrics
    history = json.loads((output / "log_history.json").read_text())
    logged = [entry for entry in history if "objective/scores" in entry]
    assert len(logged) == 60 and all("val/response_length" in entry and "objective/kl" in entry for entry in logged)
    assert (output / "curves.png").stat().st_size > 1000
    assert (output / "adapter_model.safetensors").is_file() and (output / "value" / "adapter_config.json").is_file()
    # The policy and the value model carry the chat template they were trained with (as does every checkpoint).
    assert saved_template_name(AutoTokenizer.from_pretrained(output)) == "kochatgpt_short"
    assert saved_template_name(AutoTokenizer.from_pretrained(output / "value")) == "kochatgpt_short"


def test_ppo_turns_banmal_into_hamnida_without_buying_reward_with_worse_answers(ppo_run):
    """The rule-based judge (the gold) on the same 960 held-out answers, topics SFT saw (848 answers): PPO raises the
    good and polite rates by many standard errors, and does not buy reward with unfaithful, off-topic, broken or
    repeated answers. Larger steps fail this: 4 minibatches per batch dropped faithful 0.98 -> 0.83 and on topic to
    0.94; with one other-topic answer per RM record, lr 6e-4 dropped on topic 0.99 -> 0.78 (answers about 뜨개질 to
    every question: the reward model's favourite)."""
    _, metrics = ppo_run
    before, after = metrics["judge_before"], metrics["judge_after"]
    assert before["answers"] == after["answers"] == 848 and before["unseen"]["answers"] == 112
    gain, error = paired_rate_gain(metrics["judge_flips"])
    assert gain == pytest.approx(after["good_rate"] - before["good_rate"])
    # Measured: good 0.494 -> 0.785 (+0.29, about 15 standard errors), polite 0.500 -> 0.841, on topic 0.996 ->
    # 0.980, faithful 0.978 -> 0.926. The demo issue's bar is good >= 0.80 and polite >= 0.90: not reached (notes).
    assert gain > 8 * error and gain > 0.2 and 0.25 <= before["good_rate"] <= 0.75, (before, after, error)
    assert after["good_rate"] >= 0.7, (before, after)
    assert 0.25 <= before["polite_rate"] <= 0.75 and after["polite_rate"] >= 0.75, (before, after)
    assert after["on_topic_rate"] >= before["on_topic_rate"] - 0.03 and before["on_topic_rate"] > 0.9
    assert after["faithful_rate"] >= before["faithful_rate"] - 0.08 and before["faithful_rate"] > 0.9
    assert before["broken_rate"] == after["broken_rate"] == 0.0  # no U+FFFD in any of the 1,920 answers
    assert after["unseen"]["broken_rate"] == before["unseen"]["broken_rate"] == 0.0
    assert after["hangul_share"] > 0.95 and after["repeat_rate"] <= before["repeat_rate"] + 0.02


def test_gold_against_proxy_curve(ppo_run):
    """Six evaluation points from the start to the end of training: KL to SFT, the reward model's score (the proxy)
    and the judge's good rate (the gold) on 120 answers each; both rise here, and the picture is drawn."""
    output, metrics = ppo_run
    curve = metrics["curve"]
    assert [point["step"] for point in curve] == [0, 12, 24, 36, 48, 60] and metrics["curve_answers"] == 120
    assert curve[0]["kl"] == pytest.approx(0.0, abs=1e-6) and curve[-1]["kl"] > 0.1
    assert curve[-1]["reward"] > curve[0]["reward"] and curve[-1]["good_rate"] > curve[0]["good_rate"]
    assert metrics["reward_hacking"] is None and 0 < metrics["curve_seconds"] < 30
    assert (output / "overoptimization.png").stat().st_size > 10_000


def test_reference_is_the_sft_policy_with_the_adapter_disabled(ppo_run, tiny_stages):
    output, _ = ppo_run
    sft_logits, trained_logits, reference_logits = adapter_and_reference_logits(tiny_stages["sft"], output)
    assert torch.equal(reference_logits, sft_logits)  # the reference is exactly the SFT model
    assert (trained_logits - sft_logits).abs().max() > 1e-2  # and PPO moved the policy away from it


def test_policy_equals_reference_at_step_zero(tiny_stages):
    from trl import ModelConfig

    from kochat_trl import modeling
    from kochat_trl.rl.ppo import PPOConfig, build_ppo_trainer, reference_context
    from kochat_trl.training_data import prompt_dataset

    model_args = ModelConfig(model_name_or_path=str(tiny_stages["sft"]), use_peft=True, lora_r=8)
    tokenizer = modeling.load_tokenizer(model_args, padding_side="left")
    data = prompt_dataset("bundled:ppo", tokenizer, 0.0, 0, max_samples=8)
    rm_args = ModelConfig(model_name_or_path=str(tiny_stages["rm"]))
    args = PPOConfig(
        output_dir=str(tiny_stages["root"] / "ppo-step0"),
        per_device_train_batch_size=4,
        total_episodes=8,
        report_to="none",
        bf16=False,
        response_length=8,
    )
    policy = modeling.load_causal_lm(model_args, tokenizer)
    trainer = build_ppo_trainer(
        args,
        tokenizer,
        policy,
        modeling.load_reward_model(rm_args, tokenizer),
        modeling.load_reward_model(rm_args, tokenizer),
        data["train"].select_columns(["input_ids"]),
        data["train"].select_columns(["input_ids"]),
        modeling.build_peft_config(model_args, policy, "CAUSAL_LM"),
    )
    assert trainer.ref_model is None  # no second copy: the reference is the adapter-disabled policy
    model = trainer.accelerator.unwrap_model(trainer.model).policy
    ids = torch.tensor([data["train"][0]["input_ids"]])
    with torch.no_grad():
        policy_logits = model(input_ids=ids).logits
        with reference_context(trainer):
            reference_logits = model(input_ids=ids).logits
    fresh = AutoModelForCausalLM.from_pretrained(tiny_stages["sft"]).eval()
    with torch.no_grad():
        assert torch.allclose(policy_logits, reference_logits, atol=1e-6)
        assert torch.allclose(reference_logits, fresh(input_ids=ids).logits, atol=1e-6)
