"""PPO on the embedded default: reward rises over the SFT policy within the KL bound; the reference
really is the SFT policy (LoRA adapter disabled)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import adapter_and_reference_logits
from transformers import AutoModelForCausalLM, AutoTokenizer

from kochat_trl.data.templates import saved_template_name


@pytest.fixture(scope="module")
def ppo_run(pipeline_run):
    """The shipped tiny PPO config on the tiny SFT and RM: the pipeline run's PPO stage."""
    output = pipeline_run.dir / "ppo"
    return output, json.loads((output / "metrics.json").read_text())


def test_ppo_raises_held_out_reward_within_kl_bound(ppo_run):
    output, metrics = ppo_run
    # 960 held-out answers (60 prompts x 16 samples), same seed before and after. The SFT policy answers half in
    # 반말, which the reward model ranks below 합니다체: PPO's gain is +1.18 +- 0.09 (13 standard errors).
    gain, error = metrics["reward_after"] - metrics["reward_before"], metrics["reward_gain_se"]
    assert 0.03 < error < 0.15 and gain > 5 * error, metrics
    # PPO raised the reward of its own rollouts: the mean score of the last third of the 30 updates over the first.
    scores = [entry["objective/scores"] for entry in json.loads((output / "log_history.json").read_text())[:30]]
    assert sum(scores[-10:]) / 10 > sum(scores[:10]) / 10, scores
    assert metrics["eval_samples_per_prompt"] == 16
    assert metrics["win_rate"] > 0.45
    assert 0 < metrics["kl"] <= metrics["kl_bound"] and metrics["kl_within_bound"] is True
    assert metrics["episodes"] == 960 and metrics["global_step"] == 30 and metrics["eval_prompts"] == 60
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
    assert len(logged) == 30 and all("val/response_length" in entry and "objective/kl" in entry for entry in logged)
    assert (output / "curves.png").stat().st_size > 1000
    assert (output / "adapter_model.safetensors").is_file() and (output / "value" / "adapter_config.json").is_file()
    # The policy and the value model carry the chat template they were trained with (as does every checkpoint).
    assert saved_template_name(AutoTokenizer.from_pretrained(output)) == "kochatgpt_short"
    assert saved_template_name(AutoTokenizer.from_pretrained(output / "value")) == "kochatgpt_short"


def test_ppo_turns_banmal_into_hamnida_without_buying_reward_with_worse_answers(ppo_run):
    """The rule-based judge (the gold) on the same 960 held-out answers, topics SFT saw (848 answers): PPO raises the
    good and polite rates by many standard errors, and does not buy reward with unfaithful, off-topic, broken or
    repeated answers. Larger steps fail this: 1,920 episodes at kl_coef 0.1 dropped faithful 0.96 -> 0.85 (good 0.68:
    polite, garbled answers such as "지식과 어휘력을 넓혀을 넓혀 줍니다." that the tiny reward model scores high)."""
    _, metrics = ppo_run
    before, after = metrics["judge_before"], metrics["judge_after"]
    assert before["answers"] == after["answers"] == 848 and before["unseen"]["answers"] == 112
    gain, error = metrics["judge_flips"]["good_gain"], metrics["judge_flips"]["good_gain_se"]
    assert gain == pytest.approx(after["good_rate"] - before["good_rate"])
    # Measured (seed 42, 2-core AMD EPYC): good 0.479 -> 0.771 (+0.29, 15 standard errors), polite 0.480 -> 0.798,
    # on topic 0.999 -> 1.000, faithful 0.988 -> 0.961, repeats 0.002 -> 0.011. Before the SFT data had conversations:
    # 0.467 -> 0.748, and PPO seeds 1-4 on that SFT and RM gave +0.25, +0.16, +0.16, +0.20, each over 7 standard
    # errors. The demo issue's bar, good >= 0.80 and polite >= 0.90, is not reached (the notes and ppo.yaml say why).
    # The margins are wide: the previous config's good rate landed 0.1 apart on two machines (0.785 and 0.683).
    assert gain > 8 * error and gain > 0.2 and 0.25 <= before["good_rate"] <= 0.75, (before, after, error)
    assert after["good_rate"] >= 0.65, (before, after)
    assert 0.25 <= before["polite_rate"] <= 0.75 and after["polite_rate"] >= 0.7, (before, after)
    assert after["on_topic_rate"] >= before["on_topic_rate"] - 0.03 and before["on_topic_rate"] > 0.9
    assert after["faithful_rate"] >= before["faithful_rate"] - 0.05 and before["faithful_rate"] > 0.9
    assert before["broken_rate"] == after["broken_rate"] == 0.0  # no U+FFFD in any of the 1,920 answers
    assert after["unseen"]["broken_rate"] == before["unseen"]["broken_rate"] == 0.0
    assert after["hangul_share"] > 0.95 and after["repeat_rate"] <= before["repeat_rate"] + 0.01


def test_gold_against_proxy_curve(ppo_run):
    """Six evaluation points from the start to the end of training: KL to SFT, the reward model's score (the proxy)
    and the judge's good rate (the gold) on 120 answers each; both rise here, and the picture is drawn."""
    output, metrics = ppo_run
    curve = metrics["curve"]
    assert [point["step"] for point in curve] == [0, 6, 12, 18, 24, 30] and metrics["curve_answers"] == 120
    assert curve[0]["kl"] == pytest.approx(0.0, abs=1e-6) and curve[-1]["kl"] > 0.1
    assert curve[-1]["reward"] > curve[0]["reward"] and curve[-1]["good_rate"] > curve[0]["good_rate"]
    assert metrics["reward_hacking"] is None and metrics["curve_seconds"] > 0  # its cost: a figure, never a bound
    assert (output / "overoptimization.png").stat().st_size > 10_000


def test_reference_is_the_sft_policy_with_the_adapter_disabled(ppo_run, tiny_stages):
    output, _ = ppo_run
    sft_logits, trained_logits, reference_logits = adapter_and_reference_logits(tiny_stages["sft"], output)
    assert torch.equal(reference_logits, sft_logits)  # the reference is exactly the SFT model
    assert (trained_logits - sft_logits).abs().max() > 1e-2  # and PPO moved the policy away from it


def test_policy_equals_reference_at_step_zero(tiny_stages):
    from trl import ModelConfig

    from kochat_trl.data.stages import prompt_dataset
    from kochat_trl.models import loading, lora
    from kochat_trl.rl.ppo import PPOConfig, build_ppo_trainer, reference_context

    model_args = ModelConfig(model_name_or_path=str(tiny_stages["sft"]), use_peft=True, lora_r=8)
    tokenizer = loading.load_tokenizer(model_args, padding_side="left")
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
    policy = loading.load_causal_lm(model_args, tokenizer)
    trainer = build_ppo_trainer(
        args,
        tokenizer,
        policy,
        loading.load_reward_model(rm_args, tokenizer),
        loading.load_reward_model(rm_args, tokenizer),
        data["train"].select_columns(["input_ids"]),
        data["train"].select_columns(["input_ids"]),
        lora.build_peft_config(model_args, policy, "CAUSAL_LM"),
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
