"""Shared-base PPO (`shared_base: true`): policy, reference, reward and value as adapters on one frozen SFT base.

Separate-model PPO from the same weights does the same maths (policy adapter from the same seed, value model =
the reward adapter trained further on its own copy of the base), so every logged number must agree: a difference
is a forward that ran with the wrong adapter.

The runs that need stage 2's real LoRA reward model (300 steps) are in the slow tier; the default tier checks the
refusals and the reward through the shared base on an adapter trained for 4 steps, which is all they read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_CONFIGS, plain_reward, recipe_exit, run_recipe

PPO_RUN = ["--total_episodes", "64", "--eval_prompts", "8", "--eval_samples_per_prompt", "1", "--seed", "42"]
PPO_RUN += ["--per_device_train_batch_size", "16", "--num_mini_batches", "1", "--curve_points", "0"]  # as measured
LOGGED = (
    "objective/scores",
    "objective/kl",
    "objective/entropy",
    "objective/rlhf_reward",
    "loss/policy_avg",
    "loss/value_avg",
    "policy/approxkl_avg",
    "val/clipfrac_avg",
)
PROMPT = "태권도에 대해 알려 주세요."


@pytest.fixture(scope="module")
def lora_stages(tiny_stages, tmp_path_factory) -> dict:
    """The session's SFT model and stage 2 trained on it as a LoRA adapter (recipes/configs/tiny/reward_lora.yaml)."""
    root = tmp_path_factory.mktemp("shared")
    rm = root / "rm"
    metrics = run_recipe(
        "reward", "reward_lora.yaml", "--model_name_or_path", str(tiny_stages["sft"]), "--output_dir", str(rm)
    )
    return {"root": root, "sft": tiny_stages["sft"], "rm": rm, "rm_metrics": metrics}


@pytest.fixture(scope="module")
def quick_lora_stages(tiny_stages, tmp_path_factory) -> dict:
    """The session's SFT model and a LoRA reward adapter on it trained for 4 steps: a real stage-2 folder for what
    does not depend on how well it ranks (refusals, the shared base scoring as the merged model does)."""
    root = tmp_path_factory.mktemp("shared-quick")
    rm = root / "rm"
    overrides = ["--max_steps", "4", "--eval_strategy", "no", "--save_strategy", "no", "--max_samples", "256"]
    run_recipe(
        "reward",
        "reward_lora.yaml",
        "--model_name_or_path",
        str(tiny_stages["sft"]),
        "--output_dir",
        str(rm),
        *overrides,
    )
    return {"root": root, "sft": tiny_stages["sft"], "rm": rm}


def ppo(stages: dict, name: str, *extra: str, watch=None, monkeypatch=None) -> tuple[Path, dict]:
    from kochat_trl.rl import ppo as rl_ppo

    if watch is not None:
        original = rl_ppo.train_ppo
        monkeypatch.setattr(rl_ppo, "train_ppo", lambda trainer, **kwargs: watch(trainer, original, **kwargs))
    output = stages["root"] / name
    metrics = run_recipe(
        "ppo",
        "ppo_shared.yaml",
        "--model_name_or_path",
        str(stages["sft"]),
        "--reward_model_path",
        str(stages["rm"]),
        "--output_dir",
        str(output),
        *PPO_RUN,
        *extra,
    )
    return output, metrics


class Watch:
    """Around `ppo.train_ppo`: at every update, which parameters require grad; before and after, every tensor."""

    def __init__(self) -> None:
        self.trainable_each_step: list[set[str]] = []

    def __call__(self, trainer, train, **kwargs) -> None:
        from transformers import TrainerCallback

        shared = trainer.shared_base
        watch = self

        class Record(TrainerCallback):
            def on_step_end(self, args, state, control, **_):
                watch.trainable_each_step.append({name for name, p in shared.named_parameters() if p.requires_grad})

        self.shared, self.expected = shared, set(shared.trainable_names())
        self.before = {name: p.detach().clone() for name, p in shared.named_parameters()}
        trainer.add_callback(Record())
        train(trainer, **kwargs)
        self.after = {name: p.detach().clone() for name, p in shared.named_parameters()}
        self.greedy = greedy_answer(shared.policy, trainer.processing_class)
        self.value_score = score(shared.value, trainer.processing_class)


def greedy_answer(model, tokenizer) -> str:
    from kochat_trl.data.templates import prompt_ids

    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": PROMPT}])])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    model.train(was_training)
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def score(model, tokenizer, answer: str = "태권도는 한국에서 시작된 전통 무술입니다.") -> float:
    from kochat_trl.eval.rewards import score_answers

    return score_answers(model, tokenizer, [PROMPT], [answer])[0]


@pytest.fixture(scope="module")
def runs(lora_stages) -> SimpleNamespace:
    """Separate models; shared base (watched); shared base with gradient checkpointing."""
    patch = pytest.MonkeyPatch()
    watch = Watch()
    try:
        separate = ppo(lora_stages, "separate", "--shared_base", "false")
        shared = ppo(lora_stages, "shared", watch=watch, monkeypatch=patch)
        patch.undo()
        checkpointed = ppo(lora_stages, "shared-gc", "--gradient_checkpointing", "true")
    finally:
        patch.undo()
    return SimpleNamespace(separate=separate, shared=shared, checkpointed=checkpointed, watch=watch)


def history(output: Path) -> list[dict]:
    return json.loads((output / "log_history.json").read_text())


@pytest.mark.slow
def test_lora_reward_model_reaches_held_out_accuracy(lora_stages):
    metrics = lora_stages["rm_metrics"]
    assert metrics["adapter"] is True and metrics["accuracy"] >= 0.9, metrics
    assert json.loads((lora_stages["rm"] / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["shared", "checkpointed"])
def test_shared_base_logs_what_separate_models_log(runs, variant):
    separate, shared = history(runs.separate[0]), history(getattr(runs, variant)[0])
    assert len(shared) == len(separate) == 4
    for mine, theirs in zip(shared, separate, strict=True):
        for key in LOGGED:
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (mine["step"], key)
    assert runs.shared[1]["reward_before"] == pytest.approx(runs.separate[1]["reward_before"], abs=1e-5)
    assert runs.shared[1]["kl"] == pytest.approx(runs.separate[1]["kl"], abs=1e-5)


@pytest.mark.slow
def test_only_policy_adapter_value_adapter_and_value_head_train(runs):
    watch = runs.watch
    assert watch.expected and all(".default." in n or ".value." in n or n.startswith("value.") for n in watch.expected)
    assert {n for n in watch.expected if n.startswith("value.score.")} == {"value.score.weight"}
    assert any(".lora_A.value." in n for n in watch.expected) and any(".lora_B.default." in n for n in watch.expected)
    assert len(watch.trainable_each_step) == 4
    assert all(step == watch.expected for step in watch.trainable_each_step)
    changed = {name for name in watch.before if not torch.equal(watch.before[name], watch.after[name])}
    assert changed <= watch.expected
    assert {n for n in changed if n.startswith("value.")} == {"value.score.weight"}
    assert any(".lora_A.default." in n for n in changed) and any(".lora_B.value." in n for n in changed)
    frozen = set(watch.before) - watch.expected  # the base, the reward adapter, the reward head
    assert any(".lora_A.reward." in n for n in frozen) and "reward.score.weight" in frozen
    assert all(torch.equal(watch.before[name], watch.after[name]) for name in frozen)


@pytest.mark.slow
def test_saved_policy_and_value_load_as_plain_peft_models(runs, lora_stages):
    """ppo/ is the policy adapter alone, ppo/value/ a SEQ_CLS adapter; both on the SFT base, as any client loads
    them, give what the shared model computed in training."""
    from peft import AutoPeftModelForSequenceClassification, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = runs.shared[0]
    assert sorted(path.name for path in output.iterdir() if path.is_dir()) == ["value"]  # no reward/ subfolder
    tokenizer = AutoTokenizer.from_pretrained(output)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora_stages["sft"]), output)
    assert greedy_answer(policy, tokenizer) == runs.watch.greedy
    value = AutoPeftModelForSequenceClassification.from_pretrained(output / "value", num_labels=1).eval()
    value.config.pad_token_id = tokenizer.pad_token_id
    assert score(value, tokenizer) == pytest.approx(runs.watch.value_score, abs=1e-5)
    assert runs.shared[1]["params"]["shared_base"] is True
    assert runs.shared[1]["params"]["reward"] < runs.separate[1]["params"]["reward"] / 5


def test_reward_through_the_shared_base_equals_the_merged_reward_model(quick_lora_stages, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import ModelConfig

    from kochat_trl.models.export import merge_adapter
    from kochat_trl.models.loading import load_tokenizer
    from kochat_trl.rl.models import load_ppo_models

    merge_adapter(quick_lora_stages["rm"], tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")

    model_args = ModelConfig(
        model_name_or_path=str(quick_lora_stages["sft"]),
        use_peft=True,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        lora_modules_to_save=["lm_head"],
    )
    tokenizer = load_tokenizer(model_args, padding_side="left", announce=False)
    training_args = SimpleNamespace(
        gradient_checkpointing=False, reward_model_path=str(quick_lora_stages["rm"]), seed=0, bf16=False
    )
    models = load_ppo_models(SimpleNamespace(shared_base=True), training_args, model_args, tokenizer)
    # As from_pretrained leaves a separate model: scoring switches only the head to eval, so a base left in train
    # mode would score with dropout (GPT-2's 0.1: held-out rewards 0.024 apart in the kogpt2-random benchmark).
    assert models.policy.training is False
    answers = [
        "태권도는 한국에서 시작된 전통 무술입니다. 올림픽 정식 종목입니다.",
        "Taekwondo is a martial art.",
        "파리는 프랑스의 수도입니다.",
    ]
    for answer in answers:
        assert score(models.reward, tokenizer, answer) == pytest.approx(
            plain_reward(merged, merged_tokenizer, PROMPT, answer), abs=1e-5
        )
    # The value model starts as the reward model; the reference is the SFT model itself.
    assert score(models.value, tokenizer) == pytest.approx(score(models.reward, tokenizer), abs=1e-6)
    with models.shared.reference():
        reference_answer = greedy_answer(models.policy, tokenizer)
    from transformers import AutoModelForCausalLM

    assert reference_answer == greedy_answer(AutoModelForCausalLM.from_pretrained(quick_lora_stages["sft"]), tokenizer)
    # Switching adapters never touches requires_grad.
    trainable = {name for name, p in models.shared.named_parameters() if p.requires_grad}
    assert trainable == set(models.shared.trainable_names())


@pytest.mark.slow
def test_shared_base_resumes_exactly(lora_stages, tmp_path):
    from test_reliability import interrupted_then_resumed

    def run(output: Path, *extra: str) -> dict:
        return run_recipe(
            "ppo",
            "ppo_shared.yaml",
            "--model_name_or_path",
            str(lora_stages["sft"]),
            "--reward_model_path",
            str(lora_stages["rm"]),
            "--output_dir",
            str(output),
            *PPO_RUN,
            "--total_episodes",
            "96",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            *extra,
        )

    full, stop_step, resumed = interrupted_then_resumed(run, tmp_path, max_step=6)
    assert (tmp_path / "out" / f"checkpoint-{stop_step}" / "value" / "adapter_model.safetensors").is_file()
    mine, theirs = history(tmp_path / "out"), history(tmp_path / "full")
    assert [entry["step"] for entry in mine] == [1, 2, 3, 4, 5, 6]
    for entry, reference in zip(mine, theirs, strict=True):
        assert {k: v for k, v in entry.items() if k != "eps"} == {k: v for k, v in reference.items() if k != "eps"}
    assert resumed["reward_after"] == full["reward_after"] and resumed["kl"] == full["kl"]


@pytest.mark.engines
def test_shared_base_trains_with_two_processes(lora_stages, tmp_path):
    from test_multiprocess import CPU_CONFIG, PPO_RECORDER, accelerate_launch, run

    (tmp_path / "ppo_recorder.py").write_text(PPO_RECORDER, encoding="utf-8")
    result = run(
        [
            *accelerate_launch(),
            "--config_file",
            str(CPU_CONFIG),
            str(tmp_path / "ppo_recorder.py"),
            "recipes/ppo.py",
            str(tmp_path / "ranks"),
            "--config",
            "recipes/configs/tiny/ppo_shared.yaml",
            "--use_cpu",
            "true",
            "--model_name_or_path",
            str(lora_stages["sft"]),
            "--reward_model_path",
            str(lora_stages["rm"]),
            "--output_dir",
            str(tmp_path / "ppo"),
            *PPO_RUN,
            "--per_device_train_batch_size",
            "8",
            "--local_rollout_forward_batch_size",
            "8",
        ]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads(path.read_text()) for path in sorted((tmp_path / "ranks").glob("rank*.json"))]
    assert [rank["group"] for rank in ranks] == [["gloo", 2, 0], ["gloo", 2, 1]]
    assert [rank["wrapped_in"] for rank in ranks] == ["DistributedDataParallel"] * 2
    assert ranks[0]["param_abs_sum"] == ranks[1]["param_abs_sum"]  # policy and value adapters synchronised
    assert (tmp_path / "ppo" / "value" / "adapter_model.safetensors").is_file()
    assert ranks[0]["metrics"]["params"]["shared_base"] is True


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--use_peft", "false"], "set use_peft: true"),
        (["--reward_model_path", "SFT"], "needs the reward model as a LoRA adapter folder"),
        (["--model_name_or_path", "OTHER"], "the reward adapter was trained on"),
        (["--value_model_path", "RM"], "drop value_model_path"),
    ],
)
def test_impossible_shared_base_settings_are_one_line_errors(quick_lora_stages, tmp_path, capsys, change, message):
    stages = quick_lora_stages
    other = tmp_path / "other"
    shutil.copytree(stages["sft"], other, ignore=shutil.ignore_patterns("checkpoint-*"))
    paths = {"SFT": str(stages["sft"]), "OTHER": str(other), "RM": str(stages["rm"])}
    code = recipe_exit(
        "ppo",
        TINY_CONFIGS / "ppo_shared.yaml",
        "--model_name_or_path",
        str(stages["sft"]),
        "--reward_model_path",
        str(stages["rm"]),
        "--output_dir",
        str(tmp_path / "out"),
        *[paths.get(arg, arg) for arg in change],
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_shared_base_under_deepspeed_is_refused(monkeypatch):
    from kochat_trl.config.shared_base_checks import _verify_engine
    from kochat_trl.errors import ConfigError
    from kochat_trl.run.engines import requested_engine

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="runs under DDP or one process, not DEEPSPEED"):
        _verify_engine(requested_engine())


CRITIC_FREE_RUN = [
    "--max_steps",
    "6",
    "--logging_steps",
    "1",
    "--eval_prompts",
    "8",
    "--eval_samples_per_prompt",
    "1",
    "--max_completion_length",
    "24",
    "--seed",
    "42",
]
CRITIC_FREE_LOGGED = ("loss", "grad_norm", "kl", "reward", "reward_std", "entropy", "completions/mean_length")


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["rloo", "grpo"])
def test_critic_free_reward_through_the_shared_base_logs_what_a_separate_reward_model_logs(lora_stages, trainer):
    """RLOO/GRPO with the reward model as an adapter on the policy's base: the same completions, rewards, KL and
    gradients as with stage 2's adapter merged into a separate model (TRL's "ref" adapter, deleted, draws nothing)."""

    def run(shared: str) -> tuple[list[dict], dict]:
        output = lora_stages["root"] / f"{trainer}-shared-{shared}"
        metrics = run_recipe(
            "rl",
            f"{trainer}.yaml",
            "--model_name_or_path",
            str(lora_stages["sft"]),
            "--reward_model_path",
            str(lora_stages["rm"]),
            "--output_dir",
            str(output),
            "--shared_base",
            shared,
            *CRITIC_FREE_RUN,
        )
        return [entry for entry in history(output) if "reward" in entry], metrics

    (separate, separate_metrics), (shared, shared_metrics) = run("false"), run("true")
    assert len(shared) == len(separate) == 6
    for mine, theirs in zip(shared, separate, strict=True):
        for key in CRITIC_FREE_LOGGED:
            # the same numbers up to summation order: measured within 1.1e-5 relative (RLOO's grad_norm, near 30)
            assert mine[key] == pytest.approx(theirs[key], rel=3e-5, abs=1e-5), (mine["step"], key)
    assert shared_metrics["reward_after"] == pytest.approx(separate_metrics["reward_after"], abs=1e-5)
    assert shared_metrics["params"]["shared_base"] is True
    assert shared_metrics["params"]["reward"] == 69632 + 128  # adapter + head (the separate model: 590,592)
    assert separate_metrics["params"]["reward"] == 590592
    assert (
        sorted(path.name for path in (lora_stages["root"] / f"{trainer}-shared-true").iterdir() if path.is_dir()) == []
    )  # the policy adapter alone: no reward/ or ref/ subfolders


def test_critic_free_shared_base_with_a_full_reward_model_is_a_one_line_error(tiny_stages, tmp_path, capsys):
    code = recipe_exit(
        "rl",
        TINY_CONFIGS / "grpo.yaml",
        "--shared_base",
        "true",
        "--model_name_or_path",
        str(tiny_stages["sft"]),
        "--reward_model_path",
        str(tiny_stages["rm"]),
        "--output_dir",
        str(tmp_path / "out"),
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "needs the reward model as a LoRA adapter folder" in lines[0] and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_shared_base_trains_on_a_4bit_base_with_gradient_checkpointing(lora_stages):
    """The 24 GB layout (one 4-bit base, checkpointing) runs the whole PPO loop: every update logged, the value
    model learning (its loss falls from the first update), the adapters saved."""
    import math

    output, metrics = ppo(
        lora_stages,
        "shared-4bit",
        "--load_in_4bit",
        "true",
        "--gradient_checkpointing",
        "true",
        "--total_episodes",
        "96",
    )
    logged = history(output)
    assert len(logged) == 6 and all(math.isfinite(entry["loss/value_avg"]) for entry in logged)
    assert logged[-1]["loss/value_avg"] < logged[0]["loss/value_avg"]
    assert metrics["params"]["shared_base"] is True
    assert (output / "adapter_model.safetensors").is_file()
    assert (output / "value" / "adapter_model.safetensors").is_file()


def random_reward_adapter(base: Path, folder: Path) -> Path:
    """A stage-2-shaped LoRA reward adapter (SEQ_CLS, score head saved) on `base`, untrained: nonzero lora_B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, config)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("trainer", ["rloo", "grpo"])
def test_critic_free_shared_base_reference_is_the_base_not_a_ref_adapter(tiny_model_dir, tmp_path, trainer):
    """RLOO/GRPO under shared_base compute the reference as PPO does, the base with no adapter: TRL's "ref" copy of
    the policy adapter (294,912 parameters, lm_head included, on the tiny default) is not kept, and TRL's own
    reference forward gives the base model's log-probs while the policy adapter has moved."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import ModelConfig
    from trl.trainer.utils import use_adapter

    from kochat_trl.models.loading import load_tokenizer
    from kochat_trl.rl.critic_free import RewardModelReward, build_critic_free_trainer, critic_free_classes
    from kochat_trl.rl.models import load_critic_free_models

    rm = random_reward_adapter(tiny_model_dir, tmp_path / "rm")
    model_args = ModelConfig(
        model_name_or_path=str(tiny_model_dir),
        use_peft=True,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        lora_modules_to_save=["lm_head"],
    )
    tokenizer = load_tokenizer(model_args, padding_side="left", announce=False)
    config_class, _ = critic_free_classes(trainer)
    args = config_class(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        beta=0.05,
    )
    script_args = SimpleNamespace(shared_base=True, reward_model_path=str(rm))
    models = load_critic_free_models(script_args, args, model_args, tokenizer)
    chat = [{"role": "user", "content": PROMPT}]
    built = build_critic_free_trainer(
        trainer,
        args,
        tokenizer,
        models.policy,
        RewardModelReward(models.reward, tokenizer),
        Dataset.from_dict({"prompt": [chat] * 4}),
        shared_base=models.shared,
    )
    policy = built.accelerator.unwrap_model(built.model)
    assert sorted(policy.peft_config) == ["default", "reward"]  # no "ref"
    counts = models.shared.parameter_counts()
    assert (counts["policy_adapter"], counts["reward_adapter"]) == (294912, 4096)
    assert sum(p.numel() for p in policy.parameters()) == counts["base"] + 294912 + 4096
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}

    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B.default" in name:  # the policy as training leaves it: no longer the base
                parameter.normal_(std=0.05)
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = torch.cat([ids["input_ids"], torch.tensor([[5, 6, 7, 8, 9]])], 1)
        # Exactly TRL's reference forward (RLOOTrainer and GRPOTrainer `_generate_and_score_completions`).
        with use_adapter(policy, adapter_name="ref" if "ref" in policy.peft_config else None):
            reference = torch.log_softmax(built.model(ids).logits, -1)
        trained = torch.log_softmax(built.model(ids).logits, -1)
        base = torch.log_softmax(AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits, -1)
    assert (reference - base).abs().max() < 1e-6
    assert (trained - base).abs().max() > 0.1
    assert {name for name, p in policy.named_parameters() if p.requires_grad} == trainable  # untouched
