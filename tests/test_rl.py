"""RLOO/GRPO (TRL's critic-free trainers) on the embedded default: each raises its reward, loses none on
held-out prompts beyond noise, stays within the KL bound and keeps answers ending in eos; the reward function
scores token ids with eos, so stopping matters; the recipe picks the trainer's config class from the command line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import TINY_CONFIGS, adapter_and_reference_logits, load_recipe, plain_reward, run_recipe
from transformers import AutoTokenizer

from kochat_trl.data.templates import saved_template_name

PENALTY = 1.0  # missing_eos_penalty in the shipped configs
STEPS = {"rloo": 240, "grpo": 240}  # max_steps in the shipped configs


@pytest.fixture(scope="module", params=["rloo", "grpo"])
def critic_free_run(request, tiny_stages):
    """recipes/rl.py with the shipped tiny rloo.yaml or grpo.yaml, from the session's SFT and RM."""
    trainer = request.param
    output = tiny_stages["root"] / trainer
    # One thread: the same floats as `OMP_NUM_THREADS=1 python recipes/rl.py ...`, and no thread oversubscription
    # on shared cores (2 threads on 2 busy cores made this run 10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = run_recipe(
            "rl",
            f"{trainer}.yaml",
            "--model_name_or_path",
            str(tiny_stages["sft"]),
            "--reward_model_path",
            str(tiny_stages["rm"]),
            "--output_dir",
            str(output),
        )
    finally:
        torch.set_num_threads(threads)
    return trainer, output, metrics


@pytest.fixture(scope="module")
def rm(tiny_stages):
    from trl import ModelConfig

    from kochat_trl.models import loading

    tokenizer = loading.load_tokenizer(ModelConfig(model_name_or_path=str(tiny_stages["rm"])), padding_side="left")
    return loading.load_reward_model(ModelConfig(model_name_or_path=str(tiny_stages["rm"])), tokenizer), tokenizer


@pytest.mark.slow
def test_critic_free_raises_its_reward_within_kl_bound(critic_free_run):
    trainer, output, metrics = critic_free_run
    # The trainer raised its own reward: the logged mean reward of the last third of training over the first third
    # (8 logged entries of 80 completions each).
    history = json.loads((output / "log_history.json").read_text())
    rewards = [entry["reward"] for entry in history if "reward" in entry]
    third = len(rewards) // 3
    assert sum(rewards[-third:]) / third > sum(rewards[:third]) / third + 0.1, rewards
    # On the 960 held-out answers (60 prompts x 16): the SFT policy answers half in 반말, and both move it to 합니다체.
    # GRPO: reward +1.61 +- 0.08, good 0.479 -> 0.889, faithful 0.988 -> 0.967; RLOO: +1.68 +- 0.08, good 0.479 ->
    # 0.902, faithful 0.988 -> 0.972 (before the SFT data had conversations: good 0.467 -> 0.739 and 0.801).
    gain, error = metrics["reward_after"] - metrics["reward_before"], metrics["reward_gain_se"]
    assert 0.03 < error < 0.15 and gain > 5 * error, metrics
    flips = metrics["judge_flips"]
    assert flips["good_gain"] > 0.15 and flips["good_gain"] > 6 * flips["good_gain_se"], flips
    before, after = metrics["judge_before"], metrics["judge_after"]
    # Faithful falls a little (GRPO -0.021 here; -0.043 before the conversations): the margin of DPO's test.
    assert after["faithful_rate"] >= before["faithful_rate"] - 0.08 and after["on_topic_rate"] >= 0.95
    # The gold-against-proxy curve: six points from step 0 to the last.
    assert [point["step"] for point in metrics["curve"]] == [round(STEPS[trainer] * i / 5) for i in range(6)]
    assert (output / "overoptimization.png").is_file()
    assert metrics["win_rate"] > 0.45
    assert 0 < metrics["kl"] <= metrics["kl_bound"] == 12.0 and metrics["kl_within_bound"] is True
    assert metrics["trainer"] == trainer and metrics["num_generations"] == 4
    assert metrics["global_step"] == STEPS[trainer] and metrics["completions"] == STEPS[trainer] * 16
    assert metrics["eval_prompts"] == 60
    assert metrics["eval_samples_per_prompt"] == 16
    assert 0 < metrics["params"]["policy_trainable"] < metrics["params"]["policy"]
    assert len(metrics["samples"]) == 4 and all(sample["after"] for sample in metrics["samples"])
    assert json.loads((output / "metrics.json").read_text()) == metrics
    # Our reward function, not the bare reward model, rewarded every logged step (TRL logs it by __name__).
    logged = [entry for entry in history if "reward" in entry]
    assert len(logged) == STEPS[trainer] // 5 and all(
        "rewards/reward_model/mean" in entry and "kl" in entry for entry in logged
    )
    assert yaml.safe_load((output / "config.yaml").read_text())["trainer"] == trainer
    assert (output / "curves.png").stat().st_size > 1000 and (output / "adapter_model.safetensors").is_file()
    assert saved_template_name(AutoTokenizer.from_pretrained(output)) == "kochatgpt_short"  # the chat template travels
    assert metrics["judge_before"]["answers"] == metrics["judge_after"]["answers"] == 848  # seen topics; 112 unseen
    assert metrics["judge_before"]["broken_rate"] == metrics["judge_after"]["broken_rate"] == 0.0


@pytest.mark.slow
def test_critic_free_answers_still_end_in_eos(critic_free_run):
    """With TRL's own reward-model path the RM never sees eos and the policy unlearns stopping."""
    *_, metrics = critic_free_run
    assert metrics["eos_rate_after"] >= 0.9, metrics
    assert metrics["length_after"] < 48  # answers stop before max_completion_length on average


def test_reward_function_scores_ids_up_to_eos_and_penalises_missing_eos(rm):
    from kochat_trl.errors import DataError
    from kochat_trl.eval.rewards import score_token_sequences
    from kochat_trl.rl.critic_free import RewardModelReward

    model, tokenizer = rm
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    questions = ("김치는 무엇인가요?", "서울은 어디인가요?")
    texts = ("김치는 한국의 발효 음식입니다.", "서울은 한국의 수도")
    prompts = [[{"role": "user", "content": text}] for text in questions]  # conversational, as RLOO/GRPO get them
    # The chat template renders "...### Response(응답):" and the answer follows with its leading space.
    prompt_ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True)["input_ids"] for p in prompts]
    answer_ids = [tokenizer(" " + text, add_special_tokens=False)["input_ids"] for text in texts]
    full = [p + a for p, a in zip(prompt_ids, answer_ids, strict=True)]
    with_eos = score_token_sequences(model, pad, [ids + [eos] for ids in full])
    without_eos = score_token_sequences(model, pad, full)

    reward = RewardModelReward(model, tokenizer, missing_eos_penalty=PENALTY)
    assert reward.__name__ == "reward_model"
    # TRL passes completion ids cut after eos (first answer) or at the length limit (second, no eos).
    scores = reward(prompts=prompts, completions=texts, completion_ids=[answer_ids[0] + [eos], answer_ids[1]])
    assert scores == pytest.approx([with_eos[0], without_eos[1] - PENALTY], abs=1e-5)
    # Exactly what the reward model was trained on: the (prompt, answer) chat, which ends with eos.
    assert scores[0] == pytest.approx(plain_reward(model, tokenizer, questions[0], texts[0]), abs=1e-5)
    # Tokens after eos and padding do not count; no penalty when none is configured.
    padded = [answer_ids[0] + [eos, 7, 8, pad, pad], answer_ids[1] + [pad]]
    assert reward(prompts, padded) == pytest.approx(scores, abs=1e-5)
    unpenalised = RewardModelReward(model, tokenizer)(prompts, [answer_ids[0] + [eos], answer_ids[1]])
    assert unpenalised == pytest.approx([with_eos[0], without_eos[1]], abs=1e-5)
    # Scoring the bare text (TRL's path for a reward model) reads a different position: the trap is real.
    assert abs(without_eos[0] - with_eos[0]) > 0.1
    with pytest.raises(DataError, match="conversational prompts"):
        reward(["### Instruction(명령어):\n김치는?\n\n### Response(응답):"], [answer_ids[0]])


def test_grpo_passes_completion_ids_cut_after_eos_to_the_reward_function(tiny_stages, rm, tmp_path):
    """What TRL 1.12 hands a reward function: the conversational prompts and `completion_ids` ending at the first
    eos (or at max_completion_length); the trainer logs what the function returned."""
    from trl import GRPOConfig, ModelConfig

    from kochat_trl.data.stages import prompt_dataset
    from kochat_trl.eval.rewards import score_responses
    from kochat_trl.models import loading, lora
    from kochat_trl.rl.critic_free import RewardModelReward, build_critic_free_trainer

    reward_model, tokenizer = rm
    calls = []

    class RecordingReward(RewardModelReward):
        def __call__(self, prompts, completion_ids, **kwargs):
            scores = super().__call__(prompts, completion_ids, **kwargs)
            calls.append(
                {"prompts": list(prompts), "completion_ids": completion_ids, "scores": scores, "keys": set(kwargs)}
            )
            return scores

    model_args = ModelConfig(model_name_or_path=str(tiny_stages["sft"]), use_peft=True, lora_r=8)
    data = prompt_dataset("bundled:ppo", tokenizer, 0.0, 0, max_samples=8)
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_steps=1,
        max_completion_length=16,
        beta=0.05,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    policy = loading.load_causal_lm(model_args, tokenizer)
    reward = RecordingReward(reward_model, tokenizer, PENALTY)
    prompts = data["train"].select_columns(["prompt"])
    trainer = build_critic_free_trainer(
        "grpo", args, tokenizer, policy, reward, prompts, lora.build_peft_config(model_args, policy, "CAUSAL_LM")
    )
    assert type(trainer).__name__ == "GRPOTrainer"
    trainer.train()

    assert len(calls) == 1
    call = calls[0]
    assert {"completions", "trainer_state", "log_extra", "log_metric"} <= call["keys"]
    assert len(call["prompts"]) == len(call["completion_ids"]) == 8
    assert all(prompt in prompts["prompt"] for prompt in call["prompts"])
    eos = tokenizer.eos_token_id
    for ids in call["completion_ids"]:
        assert ids and (ids.index(eos) == len(ids) - 1 if eos in ids else len(ids) == 16)
    prompt_ids = [
        tokenizer.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"] for prompt in call["prompts"]
    ]
    assert call["scores"] == score_responses(reward_model, tokenizer, prompt_ids, call["completion_ids"], PENALTY)
    logged = trainer.state.log_history[0]["rewards/reward_model/mean"]
    assert logged == pytest.approx(sum(call["scores"]) / 8, abs=1e-5)


def test_recipe_parses_with_the_requested_trainers_config(tmp_path):
    from trl import GRPOConfig, RLOOConfig

    from kochat_trl.config.parsing import parse_recipe_args
    from kochat_trl.errors import ConfigError

    recipe = load_recipe("rl")
    base = ["--output_dir", str(tmp_path / "out"), "--reward_model_path", str(tmp_path)]

    def parse(config: str, *extra: str):
        return parse_recipe_args(recipe.make_parser(), ["--config", str(TINY_CONFIGS / config), *base, *extra])

    script_args, training_args, _ = parse("rloo.yaml")
    assert (script_args.trainer, type(training_args)) == ("rloo", RLOOConfig) and training_args.beta == 0.05
    script_args, training_args, _ = parse("grpo.yaml")
    assert (script_args.trainer, type(training_args)) == ("grpo", GRPOConfig) and training_args.num_generations == 4
    script_args, training_args, _ = parse("rloo.yaml", "--trainer", "grpo")  # the command line beats the file
    assert (script_args.trainer, type(training_args)) == ("grpo", GRPOConfig)
    with pytest.raises(ConfigError, match="trainer must be one of rloo, grpo, got 'ppo'"):
        parse("rloo.yaml", "--trainer", "ppo")
    script_args, training_args, model_args = parse("rloo.yaml", "--reward_model_path", "")
    with pytest.raises(ConfigError, match="reward_model_path is not set"):
        recipe.main(script_args, training_args, model_args)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_reference_is_the_sft_policy_with_the_adapter_disabled(critic_free_run, tiny_stages):
    _, output, _ = critic_free_run
    sft_logits, trained_logits, reference_logits = adapter_and_reference_logits(tiny_stages["sft"], output)
    assert torch.equal(reference_logits, sft_logits)
    assert (trained_logits - sft_logits).abs().max() > 1e-2  # training moved the policy away from the SFT model
