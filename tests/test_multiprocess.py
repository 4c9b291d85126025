"""SFT, RM and DPO with 2 CPU processes (gloo DDP) against 1 process with the doubled per-device batch (PPO
at the end: why it cannot match, and what does).

With accelerate's default batch sharding both runs see the same global batches: every rank draws the
same seeded permutation and rank r takes batches r, r+2, ... of 8 rows, so global step k is rows
16k..16k+15 in both. SFT's loss is token-averaged over the global batch (transformers all-reduces
the token count, `average_tokens_across_devices`), RM's is a mean over equal-sized halves; eval sets
are a multiple of the global eval batch (16), so accelerate pads nothing. Hence every logged number
must agree up to float32 summation order: measured differences are below 1e-6 relative, so a 1e-4
tolerance has margin, while ranks that do not sync gradients are off by 1e-2 after one update
(and their step-1 grad_norm is one rank's, about 20% off).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "accelerate_configs" / "cpu_multiprocess.yaml"
TOLERANCE = 1e-4
LOGGED_KEYS = ("loss", "grad_norm", "eval_loss", "eval_accuracy", "rewards/margins", "eval_rewards/accuracies")

STAGES = {
    # max_samples makes the eval split 32 rows (SFT) and 48 pairs (RM, DPO): multiples of the global eval batch.
    "sft": {"recipe": "recipes/sft.py", "config": "recipes/configs/tiny/sft.yaml", "max_samples": 320},
    "rm": {"recipe": "recipes/reward.py", "config": "recipes/configs/tiny/reward.yaml", "max_samples": 480},
    # DPO from the tiny SFT model, judged on 4 held-out answers; evaluated on the held-out pairs as it trains.
    "dpo": {
        "recipe": "recipes/dpo.py",
        "config": "recipes/configs/tiny/dpo.yaml",
        "max_samples": 480,
        "extra": [
            "--eval_strategy",
            "steps",
            "--eval_prompts",
            "4",
            "--eval_samples_per_prompt",
            "1",
            "--save_total_limit",
            "2",
        ],
    },
}

# Runs a recipe unchanged (after seeding) and, on every rank, records what that rank computed: the metrics
# main() returned, the trained weights' checksum and whether train() ran under DistributedDataParallel.
RECORDER = """
import json, os, runpy, sys
from pathlib import Path

recipe, record_dir = sys.argv[1], Path(sys.argv[2])
sys.argv = [recipe, *sys.argv[3:]]
recipe_globals = runpy.run_path(recipe)  # defines main/make_parser; its __main__ block does not run

from transformers import Trainer, set_seed
from kochat_trl.recipes.steps import run_recipe

seen = {}
original_train = Trainer.train

def train(self, *args, **kwargs):
    result = original_train(self, *args, **kwargs)
    model = self.accelerator.unwrap_model(self.model)
    seen["param_abs_sum"] = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
    seen["wrapped_in"] = type(self.model_wrapped).__name__
    seen["world_size"] = self.args.world_size
    return result

Trainer.train = train

def main(script_args, training_args, model_args):
    # The reward model's new score head is drawn from the global RNG before the Trainer seeds it: without
    # this, the 1- and 2-process runs would start from different heads (DDP only makes the 2 ranks agree).
    set_seed(training_args.seed)
    metrics = recipe_globals["main"](script_args, training_args, model_args)
    record_dir.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    (record_dir / f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, **seen}))
    return metrics

run_recipe(recipe_globals["make_parser"], main)
"""


def accelerate_launch() -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch"]


def run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    # One thread per process: 2 processes on 2 shared cores, and the 1-process run is not slowed by contention.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train(stage: str, base_model: Path, work: Path, processes: int, *extra: str) -> SimpleNamespace:
    """One run of `stage` with `processes` processes and a global batch of 16; returns its folders."""
    spec = STAGES[stage]
    batch = str(16 // processes)
    output_dir, record_dir = work / f"{stage}-{processes}p", work / f"{stage}-{processes}p-ranks"
    recipe_args = [
        spec["recipe"],
        str(record_dir),
        "--config",
        spec["config"],
        "--init_tiny",
        "false",
        "--model_name_or_path",
        str(base_model),
        "--output_dir",
        str(output_dir),
        "--use_cpu",
        "true",
        "--max_samples",
        str(spec["max_samples"]),
        "--max_steps",
        "4",
        "--logging_steps",
        "1",
        "--eval_steps",
        "2",
        "--save_steps",
        "2",
        "--per_device_train_batch_size",
        batch,
        "--per_device_eval_batch_size",
        batch,
        *spec.get("extra", []),
        *extra,
    ]
    launcher = [*accelerate_launch(), "--config_file", str(CPU_CONFIG)] if processes > 1 else [sys.executable]
    result = run([*launcher, str(work / "recorder.py"), *recipe_args])
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads(path.read_text()) for path in sorted(record_dir.glob("rank*.json"))]
    return SimpleNamespace(output_dir=output_dir, ranks=ranks, stderr=result.stderr)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("multiprocess")
    (folder / "recorder.py").write_text(RECORDER, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def runs(request, tiny_model_dir, work) -> dict[int, SimpleNamespace]:
    """The stage trained with 2 processes (batch 8 each) and with 1 process (batch 16), once per module."""
    if request.param == "dpo":  # from the SFT model, judged by the reward model
        stages = request.getfixturevalue("tiny_stages")
        chained = (stages["sft"], "--reward_model_path", str(stages["rm"]))
    else:
        chained = (tiny_model_dir,)
    return {processes: train(request.param, chained[0], work, processes, *chained[1:]) for processes in (2, 1)}


def logged(output_dir: Path) -> list[tuple[int, str, float]]:
    history = json.loads((output_dir / "log_history.json").read_text(encoding="utf-8"))
    return [(entry["step"], key, entry[key]) for entry in history for key in LOGGED_KEYS if key in entry]


def split_numbers(metrics: dict) -> tuple[dict, dict]:
    floats = {key: value for key, value in metrics.items() if isinstance(value, float)}
    return floats, {key: value for key, value in metrics.items() if key not in floats}


def relative_files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


@pytest.mark.engines
@pytest.mark.parametrize("runs", ["sft", "rm", "dpo"], indirect=True)
def test_two_processes_train_as_one_ddp_group(runs):
    ranks = runs[2].ranks
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert [rank["wrapped_in"] for rank in ranks] == ["DistributedDataParallel"] * 2
    # Synchronised gradients give bit-identical weights on every rank.
    assert ranks[0]["param_abs_sum"] == ranks[1]["param_abs_sum"]
    # Every parameter that trains is used in every forward: DDP is not asked to search for unused ones (the
    # Trainer's default for a PEFT model or one without checkpointing), which warned on every rank.
    assert "find_unused_parameters=True was specified" not in runs[2].stderr


@pytest.mark.engines
@pytest.mark.parametrize("runs", ["sft", "rm", "dpo"], indirect=True)
def test_two_processes_match_one_process_with_doubled_batch(runs):
    two, one = logged(runs[2].output_dir), logged(runs[1].output_dir)
    assert [(step, key) for step, key, _ in two] == [(step, key) for step, key, _ in one]
    assert {key for _, key, _ in one} >= {"loss", "grad_norm", "eval_loss"}
    if (runs[1].output_dir / "adapter_config.json").is_file():  # DPO: its implicit rewards too
        assert {key for _, key, _ in one} >= {"rewards/margins", "eval_rewards/accuracies"}
    assert [value for *_, value in two] == pytest.approx([value for *_, value in one], rel=TOLERANCE)
    metrics = [json.loads((runs[n].output_dir / "metrics.json").read_text(encoding="utf-8")) for n in (2, 1)]
    (floats_two, rest_two), (floats_one, rest_one) = map(split_numbers, metrics)
    assert rest_two == rest_one  # rows, pairs, steps, parameter counts
    assert floats_two == pytest.approx(floats_one, rel=TOLERANCE)
    assert runs[2].ranks[0]["param_abs_sum"] == pytest.approx(runs[1].ranks[0]["param_abs_sum"], rel=TOLERANCE)


@pytest.mark.engines
@pytest.mark.parametrize("runs", ["sft", "rm", "dpo"], indirect=True)
def test_rank_zero_alone_writes_outputs(runs):
    two, one = relative_files(runs[2].output_dir), relative_files(runs[1].output_dir)
    # The same files as a 1-process run (one metrics.json, one model, the same checkpoints, no stray temp
    # files), except the Trainer's per-rank RNG state in each checkpoint.
    per_rank_rng = {name.replace("rng_state_0.pth", "rng_state.pth") for name in two if "rng_state_0" in name}
    assert {name for name in two if "rng_state" not in name} == {name for name in one if "rng_state" not in name}
    assert {name for name in one if "rng_state" in name} == per_rank_rng
    assert {name for name in two if "rng_state" in name} == {
        name.replace("rng_state.pth", f"rng_state_{rank}.pth") for name in per_rank_rng for rank in (0, 1)
    }
    assert sorted(name for name in two if name.endswith("metrics.json")) == ["metrics.json"]
    assert sorted(name.split("/")[0] for name in two if name.endswith("trainer_state.json")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]


@pytest.mark.engines
@pytest.mark.parametrize("runs", ["sft", "rm", "dpo"], indirect=True)
def test_metrics_json_holds_the_numbers_every_rank_computed(runs):
    rank0, rank1 = runs[2].ranks
    written = json.loads((runs[2].output_dir / "metrics.json").read_text(encoding="utf-8"))
    assert written == rank0["metrics"]
    # Eval loss and train loss are gathered across ranks; RM accuracy is computed on every rank over the
    # whole held-out set: either way each rank must hold the same numbers as the file.
    assert rank1["metrics"] == rank0["metrics"]


def test_processes_that_did_not_join_one_group_are_refused_in_one_line(monkeypatch):
    """What two processes launched without --use_cpu see (the launched test below, in the engines tier)."""
    from kochat_trl.config.checks import _verify_processes_joined
    from kochat_trl.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    _verify_processes_joined(SimpleNamespace(world_size=2))  # one group of two: fine
    with pytest.raises(ConfigError, match=r"^launched 2 processes but they did not form one process group .*--use_cpu"):
        _verify_processes_joined(SimpleNamespace(world_size=1))


@pytest.mark.engines
def test_cpu_launch_without_use_cpu_stops_with_one_line_error(tiny_model_dir, tmp_path):
    """Without --use_cpu the processes never join one group; each would train alone into the same folder."""
    output_dir = tmp_path / "sft"
    result = run(
        [
            *accelerate_launch(),
            "--config_file",
            str(CPU_CONFIG),
            "recipes/sft.py",
            "--config",
            "recipes/configs/tiny/sft.yaml",
            "--init_tiny",
            "false",
            "--model_name_or_path",
            str(tiny_model_dir),
            "--output_dir",
            str(output_dir),
            "--max_steps",
            "1",
        ]
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert (
        errors
        == [
            "error: launched 2 processes but they did not form one process group (no GPU found); "
            "pass --use_cpu true to train them together on CPU, or launch a single process"
        ]  # once: the second process exits 2 without printing it again
    )
    assert not output_dir.exists()


@pytest.mark.parametrize(
    ("environment", "flag", "sharding"),
    [
        ({"ACCELERATE_USE_FSDP": "true"}, "load_in_4bit", "FSDP"),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            "load_in_8bit",
            "DeepSpeed ZeRO-3",
        ),
    ],
)
def test_bitsandbytes_with_sharded_parameters_is_refused(monkeypatch, tmp_path, environment, flag, sharding):
    from trl import ModelConfig

    from kochat_trl.config.arguments import KochatArguments
    from kochat_trl.errors import ConfigError
    from kochat_trl.recipes.steps import prepare_run

    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    training_args = SimpleNamespace(
        output_dir=str(tmp_path / "out"),
        resume_from_checkpoint=None,
        fsdp=None,
        world_size=1,
        seed=0,
        per_device_train_batch_size=1,
        per_device_eval_batch_size=1,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
    )
    model_args = ModelConfig(model_name_or_path=str(tmp_path), **{flag: True})
    with pytest.raises(ConfigError, match=f"^{flag} does not combine with {sharding}; .*multi_gpu.yaml"):
        prepare_run(KochatArguments(template="kochatgpt_short"), training_args, model_args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("environment", "fsdp_argument", "expected"),
    [
        ({}, None, None),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, None, None),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, None, "DeepSpeed ZeRO-3"),
        ({"ACCELERATE_USE_FSDP": "true"}, None, "FSDP"),
        ({}, "full_shard auto_wrap", "FSDP"),  # `--fsdp` on the recipe instead of an accelerate config
    ],
)
def test_parameter_sharding_reads_the_launcher(monkeypatch, environment, fsdp_argument, expected):
    from kochat_trl.run.engines import parameter_sharding, requested_engine

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert parameter_sharding(SimpleNamespace(fsdp=fsdp_argument), requested_engine()) == expected


# PPO with 2 processes. TRL's PPOTrainer runs its own loop (not Trainer.train), so this recorder wraps
# the seam's `train_ppo`. Without kochat_trl.rl's fixes the run fails: TRL 1.12 reads `model.policy` on
# the DDP-wrapped model (trl#2375) and rank 1's save_model reads an attribute PPOTrainer never sets.
# It also records every update's rollout on its rank (TRL's `batch_generation`, looked up in its module at
# each update): the prompts and the sampled answers, padding removed.
PPO_RECORDER = """
import json, os, runpy, sys
from pathlib import Path

recipe, record_dir = sys.argv[1], Path(sys.argv[2])
sys.argv = [recipe, *sys.argv[3:]]
recipe_globals = runpy.run_path(recipe)

import torch.distributed as dist
import trl.experimental.ppo.ppo_trainer as ppo_module
from kochat_trl.rl import ppo as rl_ppo
from kochat_trl.recipes.steps import run_recipe

seen = {"rollouts": []}
original_train_ppo, original_generation = rl_ppo.train_ppo, ppo_module.batch_generation

def train_ppo(trainer, *args, **kwargs):
    original_train_ppo(trainer, *args, **kwargs)
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    seen["param_abs_sum"] = float(sum(p.detach().double().abs().sum() for p in policy.parameters()))
    seen["wrapped_in"] = type(trainer.model).__name__
    seen["group"] = [dist.get_backend(), dist.get_world_size(), dist.get_rank()] if dist.is_initialized() else None
    seen["batch_size"] = trainer.args.batch_size

def batch_generation(model, queries, chunk, pad_token_id, *args, **kwargs):
    query_responses, logits = original_generation(model, queries, chunk, pad_token_id, *args, **kwargs)
    unpadded = lambda rows: [[token for token in row if token != pad_token_id] for row in rows.tolist()]
    seen["rollouts"].append({"queries": unpadded(queries),
                             "responses": unpadded(query_responses[:, queries.shape[1]:])})
    return query_responses, logits

rl_ppo.train_ppo = train_ppo  # the recipe imports kochat_trl.rl.ppo inside main(), so it calls this
ppo_module.batch_generation = batch_generation

def main(script_args, training_args, model_args):
    metrics = recipe_globals["main"](script_args, training_args, model_args)
    record_dir.mkdir(parents=True, exist_ok=True)
    (record_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"metrics": metrics, **seen}))
    return metrics

run_recipe(recipe_globals["make_parser"], main)
"""
PPO_EPISODES, PPO_PER_DEVICE_BATCH = 64, 8
PPO_KEYS = ("objective/scores", "objective/kl", "objective/entropy", "loss/policy_avg", "loss/value_avg")


def train_ppo(tiny_stages: dict, work: Path, processes: int) -> SimpleNamespace:
    """PPO from the session's SFT and RM, 64 episodes in global batches of 16: 2 processes x 8 or 1 x 16."""
    output_dir, record_dir = work / f"ppo-{processes}p", work / f"ppo-{processes}p-ranks"
    (work / "ppo_recorder.py").write_text(PPO_RECORDER, encoding="utf-8")
    launcher = [*accelerate_launch(), "--config_file", str(CPU_CONFIG)] if processes > 1 else [sys.executable]
    result = run(
        [
            *launcher,
            str(work / "ppo_recorder.py"),
            "recipes/ppo.py",
            str(record_dir),
            "--config",
            "recipes/configs/tiny/ppo.yaml",
            "--use_cpu",
            "true",
            "--model_name_or_path",
            str(tiny_stages["sft"]),
            "--reward_model_path",
            str(tiny_stages["rm"]),
            "--output_dir",
            str(output_dir),
            "--total_episodes",
            str(PPO_EPISODES),
            "--eval_prompts",
            "16",
            "--eval_samples_per_prompt",
            "1",
            "--per_device_train_batch_size",
            str(2 * PPO_PER_DEVICE_BATCH // processes),
            "--num_mini_batches",
            "1",
            "--curve_points",
            "0",
            # Answers are sampled 8 prompts at a time in both runs: one process's first 8 then draw from the
            # generator exactly as rank 0's 8 do (sampling 16 rows at once would consume it differently).
            "--local_rollout_forward_batch_size",
            str(PPO_PER_DEVICE_BATCH),
        ]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads(path.read_text()) for path in sorted(record_dir.glob("rank*.json"))]
    return SimpleNamespace(output_dir=output_dir, ranks=ranks, stderr=result.stderr)


@pytest.fixture(scope="module")
def ppo_two_processes(tiny_stages, work) -> SimpleNamespace:
    return train_ppo(tiny_stages, work, 2)


@pytest.fixture(scope="module")
def ppo_one_process(tiny_stages, work) -> SimpleNamespace:
    return train_ppo(tiny_stages, work, 1)


@pytest.mark.engines
def test_ppo_two_processes_train_as_one_ddp_group(ppo_two_processes):
    ranks = ppo_two_processes.ranks
    assert [rank["group"] for rank in ranks] == [["gloo", 2, 0], ["gloo", 2, 1]]
    assert [rank["wrapped_in"] for rank in ranks] == ["DistributedDataParallel"] * 2
    assert [rank["batch_size"] for rank in ranks] == [2 * PPO_PER_DEVICE_BATCH] * 2  # global batch
    assert ranks[0]["param_abs_sum"] == ranks[1]["param_abs_sum"]  # gradients synchronised


@pytest.mark.engines
def test_ppo_two_processes_write_one_run_folder_from_rank_zero(ppo_two_processes):
    import math

    from safetensors import safe_open

    output_dir, (rank0, rank1) = ppo_two_processes.output_dir, ppo_two_processes.ranks
    files = relative_files(output_dir)
    assert sorted(name for name in files if name.endswith("metrics.json")) == ["metrics.json"]
    assert sorted(name for name in files if name.endswith(".safetensors")) == [
        "adapter_model.safetensors",
        "value/adapter_model.safetensors",
    ]
    assert not [name for name in files if name.split("/")[-1].startswith((".", "tmp"))]  # no stray temp files
    with safe_open(str(output_dir / "adapter_model.safetensors"), "pt") as adapter:
        assert not [key for key in adapter.keys() if "value_model" in key or "score" in key]  # the policy alone
    written = json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))
    assert written == rank0["metrics"] == rank1["metrics"]  # same weights, same seeded evaluation on both ranks
    assert written["episodes"] == PPO_EPISODES and written["global_step"] == PPO_EPISODES // (2 * PPO_PER_DEVICE_BATCH)
    numbers = [written[key] for key in ("reward_before", "reward_after", "kl", "win_rate", "train_kl_last")]
    assert all(isinstance(value, float) and math.isfinite(value) for value in numbers), numbers
    history = json.loads((output_dir / "log_history.json").read_text(encoding="utf-8"))
    assert [entry["episode"] for entry in history if "objective/kl" in entry] == [16, 32, 48, 64]


@pytest.mark.engines
def test_ppo_two_processes_sample_the_one_process_batches_and_rank_zero_its_answers(ppo_two_processes, ppo_one_process):
    """Unlike SFT, RM and DPO, PPO with 2 processes x 8 does not reproduce 1 process x 16, and no tolerance would
    make it: TRL 1.12's PPOTrainer (trl/experimental/ppo/ppo_trainer.py)
    1. samples rank r's answers from `seed + 100003 * r` (its `local_seed`): rank 0 draws what the single process
       draws for the first half of its batch, rank 1 other answers than the second half;
    2. whitens the advantages over each rank's own 8 rollouts (`masked_whiten(advantages, ~padding_mask)`), not
       over all 16, and
    3. takes the token-weighted mean loss (`masked_mean`) per rank, and DDP averages the two, so answers of
       unequal length weigh differently than in one batch of 16.
    2 and 3 change the update even for identical answers. What does hold is asserted: every global batch has the
    same prompts, rank 0's first answers are token for token the single process's (same models, same seed), the
    logs have the same entries, and the ranks keep one set of weights (test_ppo_two_processes_train_as_one_ddp_group).
    Measured (the session's SFT and RM): rank 0's first 8 answers equal the single process's, rank 1's differ in 4
    of 8 (the others are sentences the SFT model recalls whatever the seed); from update 2 on rank 0's differ too
    (1-2 of 8), the models having diverged. Logged per update, 2 x 8 vs 1 x 16: objective/scores 2.61, 2.37, 2.60,
    1.64 vs 2.51, 2.29, 2.16, 3.21; objective/kl 0.000, -0.016, 0.041, 0.040 vs 0.000, 0.001, 0.040, 0.024;
    loss/value_avg 4.72, 4.89, 4.06, 4.06 vs 4.99, 4.88, 3.88, 3.88."""
    (rank0, rank1), one = ppo_two_processes.ranks, ppo_one_process.ranks[0]
    updates = PPO_EPISODES // (2 * PPO_PER_DEVICE_BATCH)
    assert one["group"] is None and one["batch_size"] == 2 * PPO_PER_DEVICE_BATCH  # the doubled batch, no group
    assert len(rank0["rollouts"]) == len(rank1["rollouts"]) == len(one["rollouts"]) == updates
    for mine, theirs, single in zip(rank0["rollouts"], rank1["rollouts"], one["rollouts"], strict=True):
        assert len(mine["queries"]) == len(theirs["queries"]) == PPO_PER_DEVICE_BATCH
        assert mine["queries"] + theirs["queries"] == single["queries"]  # rank 0 the first half, rank 1 the second
    first = one["rollouts"][0]["responses"]
    assert rank0["rollouts"][0]["responses"] == first[:PPO_PER_DEVICE_BATCH]
    resampled = sum(mine != theirs for mine, theirs in zip(rank1["rollouts"][0]["responses"], first[8:], strict=True))
    # Another seed (measured 4 of 8 differ). Should TRL ever sample rank r's rows as one process does, this fails:
    # then check whether the logs agree and the README may say so.
    assert resampled >= 1, resampled

    two_log, one_log = (
        json.loads((run.output_dir / "log_history.json").read_text(encoding="utf-8"))
        for run in (ppo_two_processes, ppo_one_process)
    )
    assert (
        [(entry["step"], entry["episode"]) for entry in two_log]
        == [(entry["step"], entry["episode"]) for entry in one_log]
        == [(1, 16), (2, 32), (3, 48), (4, 64)]
    )
    assert [set(entry) for entry in two_log] == [set(entry) for entry in one_log]
    assert all(set(PPO_KEYS) <= set(entry) for entry in one_log)
