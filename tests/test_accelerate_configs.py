"""Every accelerate config loads with accelerate's own classes and says what docs/scaling.md claims."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "accelerate_configs"
SCALING_DOC = ROOT / "docs" / "scaling.md"

# Which launcher `accelerate launch` picks: "torchrun" starts num_processes processes, "simple" one.
EXPECTED = {
    "single_gpu.yaml": {
        "distributed_type": "NO",
        "num_processes": 1,
        "mixed_precision": "bf16",
        "use_cpu": False,
        "launcher": "simple",
    },
    "multi_gpu.yaml": {
        "distributed_type": "MULTI_GPU",
        "num_processes": 8,
        "mixed_precision": "bf16",
        "use_cpu": False,
        "launcher": "torchrun",
    },
    "deepspeed_zero2.yaml": {
        "distributed_type": "DEEPSPEED",
        "num_processes": 8,
        "mixed_precision": "bf16",
        "use_cpu": False,
        "launcher": "deepspeed",
    },
    "deepspeed_zero3.yaml": {
        "distributed_type": "DEEPSPEED",
        "num_processes": 8,
        "mixed_precision": "bf16",
        "use_cpu": False,
        "launcher": "deepspeed",
    },
    "fsdp.yaml": {
        "distributed_type": "FSDP",
        "num_processes": 8,
        "mixed_precision": "bf16",
        "use_cpu": False,
        "launcher": "fsdp",
    },
    # MULTI_GPU on purpose: the torchrun launcher is the one that really starts 2 processes on a CPU machine.
    "cpu_multiprocess.yaml": {
        "distributed_type": "MULTI_GPU",
        "num_processes": 2,
        "mixed_precision": "no",
        "use_cpu": True,
        "launcher": "torchrun",
        "main_process_port": 0,
    },
}

NESTED = {
    "deepspeed_zero2.yaml": (
        "deepspeed_config",
        {
            "zero_stage": 2,
            "zero3_init_flag": False,
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
        },
    ),
    "deepspeed_zero3.yaml": (
        "deepspeed_config",
        {
            "zero_stage": 3,
            "zero3_init_flag": True,
            "zero3_save_16bit_model": True,
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
        },
    ),
    "fsdp.yaml": (
        "fsdp_config",
        {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_offload_params": False,
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_activation_checkpointing": False,
        },
    ),
}


def launcher_view(*launch_args: str):
    """The arguments `accelerate launch` ends up with: its own merge of the YAML and the flags (no launch)."""
    args = launch_command_parser().parse_args([*launch_args, "recipes/sft.py"])
    args, _, _ = _validate_launch_command(args)
    return args


def launcher_of(args) -> str:
    if args.use_deepspeed:
        return "deepspeed"
    if args.use_fsdp:
        return "fsdp"
    return "torchrun" if args.multi_gpu else "simple"


def documented_configs() -> dict[str, dict[str, str]]:
    """Rows of the `| Config | distributed_type | ... |` table in docs/scaling.md, by file name."""
    lines = SCALING_DOC.read_text(encoding="utf-8").splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.startswith("| Config | distributed_type"))
    header = [cell.strip() for cell in lines[header_at].strip("|").split("|")]
    rows = {}
    for line in lines[header_at + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        rows[re.fullmatch(r"`(.+)`", cells["Config"]).group(1)] = cells
    return rows


def test_every_config_is_tested_and_documented():
    on_disk = sorted(path.name for path in CONFIG_DIR.glob("*.yaml"))
    assert on_disk == sorted(EXPECTED)
    assert sorted(documented_configs()) == on_disk


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate_and_has_the_settings(name):
    expected = EXPECTED[name]
    config = load_config_from_file(str(CONFIG_DIR / name))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == DistributedType(expected["distributed_type"])
    assert (config.num_processes, config.mixed_precision, config.use_cpu) == (
        expected["num_processes"],
        expected["mixed_precision"],
        expected["use_cpu"],
    )
    assert (config.num_machines, config.machine_rank) == (1, 0)
    assert config.main_process_port == expected.get("main_process_port")
    section, settings = NESTED.get(name, (None, {}))
    for other in ("deepspeed_config", "fsdp_config"):
        if other != section:
            assert getattr(config, other) == {}
    if section:
        assert {key: getattr(config, section).get(key) for key in settings} == settings
    if section == "deepspeed_config":
        # A value here would have to equal every recipe's gradient_accumulation_steps; the recipe's own is used.
        assert "gradient_accumulation_steps" not in config.deepspeed_config


@pytest.mark.parametrize("name", sorted(NESTED))
def test_nested_keys_are_options_the_launcher_knows(name):
    # ClusterConfig accepts any key under deepspeed_config/fsdp_config; a misspelt one would be silently ignored.
    options = {action.dest for action in launch_command_parser()._actions}
    section, _ = NESTED[name]
    keys = getattr(load_config_from_file(str(CONFIG_DIR / name)), section)
    assert sorted(set(keys) - options) == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launcher_resolves_config_as_documented(name):
    expected = EXPECTED[name]
    args = launcher_view("--config_file", str(CONFIG_DIR / name))
    assert launcher_of(args) == expected["launcher"]
    assert (args.num_processes, args.mixed_precision) == (expected["num_processes"], expected["mixed_precision"])
    _, settings = NESTED.get(name, (None, {}))
    assert {key: getattr(args, key) for key in settings} == settings  # the launcher passes these on


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scaling_doc_table_matches_config(name):
    row = documented_configs()[name]
    config = load_config_from_file(str(CONFIG_DIR / name))
    assert row["distributed_type"] == config.distributed_type.value
    assert int(row["num_processes"]) == config.num_processes
    assert row["mixed_precision"] == config.mixed_precision


def test_launcher_flags_override_the_yaml():
    args = launcher_view(
        "--config_file", str(CONFIG_DIR / "multi_gpu.yaml"), "--num_processes", "4", "--mixed_precision", "no"
    )
    assert (launcher_of(args), args.num_processes, args.mixed_precision) == ("torchrun", 4, "no")
    args = launcher_view(
        "--config_file",
        str(CONFIG_DIR / "deepspeed_zero3.yaml"),
        "--offload_optimizer_device",
        "cpu",
        "--offload_param_device",
        "cpu",
    )
    assert (args.zero_stage, args.offload_optimizer_device, args.offload_param_device) == (3, "cpu", "cpu")


def test_multi_node_example_runs_num_processes_over_all_machines():
    from accelerate.utils.launch import prepare_multi_gpu_env

    # The docs/scaling.md example, as machine 1 runs it (machine 1 skips the port check machine 0 does).
    args = launcher_view(
        "--config_file",
        str(CONFIG_DIR / "multi_gpu.yaml"),
        "--num_machines",
        "2",
        "--num_processes",
        "16",
        "--machine_rank",
        "1",
        "--main_process_ip",
        "10.0.0.1",
        "--main_process_port",
        "29500",
    )
    prepare_multi_gpu_env(args)
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("8", "2", 1)
    # torchrun finds machine 0 here (the launcher never reads the YAML's same_network: its flag defaults to False).
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("static", "10.0.0.1:29500")
    doc = SCALING_DOC.read_text(encoding="utf-8")
    assert "--num_machines 2 --num_processes 16 --machine_rank 0" in doc
    assert "--main_process_ip 10.0.0.1 --main_process_port 29500" in doc
