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


def test_ppo_raises_held_out_reward_within_kl_bound(ppo_run):
    output, metrics = ppo_run
    # 960 held-out answers (60 prompts x 16 samples), same seed before and after. PPO's gain on the tiny default is
    # small next to its noise: over seeds 42 and 1-4 of this config +0.06, +0.07, +0.37, +0.24, -0.09, each +-0.05
    # (reward_gain_se), so the test asserts no loss beyond noise, which a too-large step fails (lr 5e-4: -0.07,
    # -0.16, -0.08 with on topic down to 0.83), and a standard error that really is the paired one.
    gain, error = metrics["reward_after"] - metrics["reward_before"], metrics["reward_gain_se"]
    assert 0.03 < error < 0.12 and gain > -2 * error, metrics
    # PPO raised the reward of its own rollouts: the mean score of the last third of the 60 updates over the first
    # third (320 rollouts each; +0.28 here, and above zero in 21 of 23 runs over the seeds and settings tried).
    scores = [entry["objective/scores"] for entry in json.loads((output / "log_history.json").read_text())[:60]]
    assert sum(scores[-20:]) / 20 > sum(scores[:20]) / 20, scores
    assert metrics["eval_samples_per_prompt"] == 16
    assert metrics["win_rate"] > 0.45
    assert 0 < metrics["kl"] <= metrics["kl_bound"] and metrics["kl_within_bound"] is True
    assert metrics["episodes"] == 960 and metrics["global_step"] == 60 and metrics["eval_prompts"] == 60
    assert metrics["params"]["reference_extra"] == 0  # LoRA: the reference costs no memory
    assert 0 < metrics["params"]["policy_trainable"] < metrics["params"]["policy"]
    assert 0 < metrics["params"]["value_trainable"] < metrics["params"]["value"]
    assert len(metrics["samples"]) == 3 and all(sample["after"] for sample in metrics["samples"])
    assert json.loads((output / "metrics.json").read_text()) == metrics
    history = json.loads((output / "log_history.json").read_text())
    logged = [entry for entry in history if "objective/scores" in entry]
    assert len(logged) == 60 and all("val/response_length" in entry and "objective/kl" in entry for entry in logged)
    assert (output / "curves.png").stat().st_size > 1000
    assert (output / "adapter_model.safetensors").is_file() and (output / "value" / "adapter_config.json").is_file()
    # The policy and the value model carry the chat template they were trained with (as does every checkpoint).
    assert saved_template_name(AutoTokenizer.from_pretrained(output)) == "kochatgpt_short"
    assert saved_template_name(AutoTokenizer.from_pretrained(output / "value")) == "kochatgpt_short"


def test_ppo_does_not_buy_reward_with_worse_answers(ppo_run):
    """The rule-based judge on the same 960 held-out answers: PPO did not answer off topic, impolitely or with
    broken characters more often than the SFT policy. Measured over seeds 42 and 1-4: on topic within 5 of 960
    answers of the SFT policy's each time. Reward hacking fails this: lr 1e-3 instead of 2e-4 dropped on topic from
    0.81 to 0.70, lr 5e-4 from 0.89 to 0.83, and 3,840 episodes in batches of 32 from 0.89 to 0.83 while the reward
    rose by 0.26; lr 3e-3 at temperature 1.0 dropped it to 0.25."""
    _, metrics = ppo_run
    before, after = metrics["judge_before"], metrics["judge_after"]
    assert before["answers"] == after["answers"] == 960 and before["on_topic_answers"] == 960
    assert after["on_topic_rate"] >= before["on_topic_rate"] - 0.01 and before["on_topic_rate"] > 0.8, (before, after)
    assert after["polite_rate"] >= before["polite_rate"] - 0.005 and before["polite_rate"] > 0.95
    assert before["broken_rate"] == after["broken_rate"] == 0.0  # no U+FFFD in any of the 1,920 answers
    assert after["hangul_share"] > 0.95 and after["repeat_rate"] <= before["repeat_rate"] + 0.02


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
