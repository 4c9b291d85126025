"""fit-check: exact parameter/weight/optimizer bytes against real models, activation formula against the
bytes autograd actually saves, verdicts and knobs, CLI errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from kochat_trl.errors import KochatError
from kochat_trl.fitcheck.estimate import estimate
from kochat_trl.fitcheck.memory import activation_bytes, lora_param_count, trainable_params, weight_bytes
from kochat_trl.fitcheck.presets import resolve_model_config
from kochat_trl.fitcheck.settings import GIB, FitSettings, parse_memory
from kochat_trl.fitcheck.shape import model_shape
from kochat_trl.fitcheck.suggest import suggest

KOGPT2 = "skt/kogpt2-base-v2"
POLYGLOT_1_3B = "EleutherAI/polyglot-ko-1.3b"
POLYGLOT_5_8B = "EleutherAI/polyglot-ko-5.8b"
POLYGLOT_12_8B = "EleutherAI/polyglot-ko-12.8b"
GB24 = 24 * GIB


def _config(name):
    return resolve_model_config(name)


# --- memory strings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GB", 24 * GIB),
        ("24", 24 * GIB),
        ("80 GiB", 80 * GIB),
        ("16000MB", 16000 * 2**20),
        ("1.5T", 1536 * GIB),
        ("512b", 512),
        ("40g", 40 * GIB),
    ],
)
def test_parse_memory_binary_units(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["24XB", "GB", "-1GB", "0GB", "24 GBs", ""])
def test_parse_memory_rejects_nonsense(text):
    with pytest.raises(KochatError, match="--gpu-memory"):
        parse_memory(text)


# --- exact parameter counts ---------------------------------------------------------------------------


def test_kogpt2_count_matches_a_real_gpt2_and_the_known_size():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        reference = GPT2LMHeadModel(GPT2Config(vocab_size=51200, n_embd=768, n_layer=12, n_head=12, n_positions=1024))
    assert model_shape(_config(KOGPT2)).param_count == sum(p.numel() for p in reference.parameters()) == 125_164_032


@pytest.mark.parametrize(
    ("name", "hidden", "layers", "inner", "card"),
    [
        (POLYGLOT_1_3B, 2048, 24, 8192, 1_331_810_304),
        (POLYGLOT_5_8B, 4096, 28, 16384, 5_885_059_072),
        (POLYGLOT_12_8B, 5120, 40, 20480, None),
    ],
)
def test_polyglot_counts_match_gpt_neox_layout_and_model_cards(name, hidden, layers, inner, card):
    # GPT-NeoX layer: fused qkv + dense (with biases), two MLP linears (with biases), two LayerNorms;
    # untied embeddings and lm_head, final LayerNorm.
    per_layer = 4 * hidden**2 + 2 * hidden * inner + 9 * hidden + inner
    expected = layers * per_layer + 2 * 30080 * hidden + 2 * hidden
    count = model_shape(_config(name)).param_count
    assert count == expected
    if card is not None:  # the 12.8b card lists 12,898,631,680, which its own config.json does not give
        assert count == card


def test_tiny_llama_counts_match_the_real_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = resolve_model_config(str(tiny_model_dir))
    causal = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    assert model_shape(config, "clm").param_count == sum(p.numel() for p in causal.parameters())
    assert model_shape(config, "cls").param_count == sum(p.numel() for p in classifier.parameters())
    # a config.json path resolves to the same model as its folder
    assert model_shape(resolve_model_config(str(tiny_model_dir / "config.json"))).param_count == (
        model_shape(config).param_count
    )


def test_weight_bytes_per_dtype_are_exact_multiples():
    for name in (KOGPT2, POLYGLOT_1_3B):
        shape = model_shape(_config(name))
        assert weight_bytes(shape, FitSettings(dtype="fp32")) == 4 * shape.param_count
        assert weight_bytes(shape, FitSettings(dtype="bf16")) == 2 * shape.param_count
        assert weight_bytes(shape, FitSettings(dtype="fp16")) == 2 * shape.param_count
        four, eight, bf16 = (weight_bytes(shape, FitSettings(quantization=q)) for q in ("4bit", "8bit", None))
        assert four < eight < bf16


# --- components against real tensors -----------------------------------------------------------------

TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def _frozen_bytes(model) -> int:
    """Frozen weights plus bitsandbytes' quantization state (nf4 absmax; int8 row scales, which move from the
    weight to `module.state` on the first forward)."""
    tensors = []
    for module in model.modules():
        state = getattr(module, "state", None)
        for parameter in module.parameters(recurse=False):
            if parameter.requires_grad:
                continue
            quant_state = getattr(parameter, "quant_state", None)
            tensors += [
                parameter,
                getattr(quant_state, "absmax", None),
                getattr(parameter, "SCB", None),
                getattr(state, "SCB", None),
                getattr(state, "CB", None),
            ]
    return _storage_bytes(tensors)


@pytest.mark.parametrize(
    ("stage", "settings"),
    [
        ("sft", FitSettings(dtype="fp32", lora=False)),
        ("rm", FitSettings(dtype="bf16", lora=False)),
        ("sft", FitSettings(dtype="bf16")),
        ("rm", FitSettings(dtype="bf16")),
        ("sft", FitSettings(quantization="4bit")),
        ("rm", FitSettings(quantization="4bit")),
        ("sft", FitSettings(quantization="8bit")),
    ],
    ids=["sft-fp32-full", "rm-bf16-full", "sft-bf16-lora", "rm-bf16-lora", "sft-4bit", "rm-4bit", "sft-8bit"],
)
def test_weights_and_optimizer_components_equal_real_tensor_bytes(tiny_model_dir, stage, settings):
    """Load the tiny model the way the recipes do, take one AdamW step, sum the tensors' bytes: exact match."""
    from peft import get_peft_model
    from trl import ModelConfig

    from kochat_trl.models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from kochat_trl.models.lora import build_peft_config

    args = ModelConfig(
        model_name_or_path=str(tiny_model_dir),
        dtype=TORCH_DTYPE[settings.dtype],
        use_peft=settings.lora,
        lora_r=settings.lora_r,
        load_in_8bit=settings.quantization == "8bit",
        load_in_4bit=settings.quantization == "4bit",
    )
    tokenizer = load_tokenizer(args)
    loader, task = (load_causal_lm, "CAUSAL_LM") if stage == "sft" else (load_reward_model, "SEQ_CLS")
    model = loader(args, tokenizer)
    if settings.lora:
        model = get_peft_model(model, build_peft_config(args, model, task))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    output = model(input_ids=ids, labels=ids) if stage == "sft" else model(input_ids=ids)
    (output.loss if stage == "sft" else output.logits.float().sum()).backward()
    optimizer.step()

    result = estimate(resolve_model_config(str(tiny_model_dir)), stage, settings)
    trainable_bytes = _storage_bytes(trainable)
    assert result.bytes_of("weights") == _frozen_bytes(model) + (0 if settings.lora else trainable_bytes)
    assert result.bytes_of("adapter") == (trainable_bytes if settings.lora else 0)
    assert result.bytes_of("gradients") == _storage_bytes(p.grad for p in trainable)
    states = [state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
    assert result.bytes_of("optimizer") == _storage_bytes(states)
    assert result.trainable_params == sum(p.numel() for p in trainable)


def test_shared_base_reward_model_is_its_adapter_and_head_in_real_tensor_bytes(tiny_model_dir):
    """--shared-base: the reward model costs what a LoRA reward model holds beyond its base, the value model no
    weights of its own (both sit on the policy's base). Measured on the real PEFT reward model, bf16."""
    from peft import get_peft_model
    from trl import ModelConfig

    from kochat_trl.models.loading import load_reward_model, load_tokenizer
    from kochat_trl.models.lora import build_peft_config

    args = ModelConfig(model_name_or_path=str(tiny_model_dir), dtype=TORCH_DTYPE["bf16"], use_peft=True, lora_r=16)
    reward = load_reward_model(args, load_tokenizer(args))
    reward = get_peft_model(reward, build_peft_config(args, reward, "SEQ_CLS"))
    own = [p for name, p in reward.named_parameters() if "lora_" in name or "modules_to_save" in name]
    assert own and _storage_bytes(own) < _storage_bytes(reward.parameters()) / 5  # tiny: 10 %; 12.8b: 0.3 %
    config = resolve_model_config(str(tiny_model_dir))
    settings = FitSettings(dtype="bf16", seq_len=256, response_length=64)
    shared = estimate(config, "ppo", replace(settings, shared_base=True))
    separate = estimate(config, "ppo", settings)
    assert shared.bytes_of("reward_weights") == _storage_bytes(own)
    assert shared.bytes_of("value_weights") == 0 < separate.bytes_of("value_weights")
    assert shared.bytes_of("policy_weights") == separate.bytes_of("policy_weights")
    assert shared.bytes_of("value_adapter") == separate.bytes_of("value_adapter") > 0


TINY_CONFIGS = {
    "gpt2": {"vocab_size": 1000, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "gpt_neox": {
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
    },
    "llama": {
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_lora_counts_equal_what_peft_reports(model_type):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from kochat_trl.models.lora import lora_target_modules

    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    causal = get_peft_model(
        AutoModelForCausalLM.from_config(config), LoraConfig(r=8, target_modules=lora_target_modules(config))
    )
    assert causal.get_nb_trainable_parameters()[0] == lora_param_count(model_shape(config, "clm"), 8)

    config.num_labels = 1
    lora = LoraConfig(r=8, target_modules=lora_target_modules(config), task_type="SEQ_CLS", modules_to_save=["score"])
    classifier = get_peft_model(AutoModelForSequenceClassification.from_config(config), lora)
    settings = FitSettings(lora_r=8)
    assert classifier.get_nb_trainable_parameters()[0] == trainable_params(model_shape(config, "cls"), settings)[0]


# --- activations against what autograd keeps -------------------------------------------------------


def _saved_bytes(model, ids) -> int:
    """Distinct storages autograd keeps for backward during one forward, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return sum(saved.values())


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_formula_tracks_saved_tensor_bytes(model_type, lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from kochat_trl.models.lora import lora_target_modules

    # Dropout off: on CPU its masks are stored in the compute dtype, on CUDA as 1-byte bools. Four layers:
    # under LoRA, layer 0 keeps less (frozen embeddings; GPT-NeoX's parallel MLP there has no trainable path).
    overrides = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if model_type == "gpt2" else {}
    layers = {"n_layer": 4} if model_type == "gpt2" else {"num_hidden_layers": 4}
    values = {**TINY_CONFIGS[model_type], **overrides, **layers}
    config = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(torch.bfloat16)
    if lora:
        model = get_peft_model(model, LoraConfig(r=16, lora_dropout=0.0, target_modules=lora_target_modules(model)))
    model.train()
    batch, length = 2, 96
    ids = torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(0))
    measured = _saved_bytes(model, ids) - batch * length * 1000 * 4  # the fp32 log-softmax is the logits part
    settings = FitSettings(dtype="bf16", lora=lora, lora_dropout=0.0)
    estimated = activation_bytes(model_shape(config), settings, batch * length, dropout=True)
    assert 0.85 <= estimated / measured <= 1.2, (estimated, measured)


def test_activations_scale_with_tokens_and_shrink_with_checkpointing():
    shape = model_shape(_config(POLYGLOT_1_3B))
    plain, checkpointed = FitSettings(), FitSettings(gradient_checkpointing=True)
    assert activation_bytes(shape, plain, 2048, True) == 2 * activation_bytes(shape, plain, 1024, True)
    assert activation_bytes(shape, checkpointed, 2048, True) < activation_bytes(shape, plain, 2048, True) / 5
    config = _config(POLYGLOT_1_3B)
    with_gc = estimate(config, "sft", checkpointed)
    without = estimate(config, "sft", plain)
    assert with_gc.bytes_of("activations") < without.bytes_of("activations")
    assert with_gc.bytes_of("weights") == without.bytes_of("weights")


def test_logits_are_tokens_times_vocab_times_element_plus_fp32_copies():
    result = estimate(_config(KOGPT2), "sft", FitSettings(batch_size=3, seq_len=100))
    assert result.bytes_of("logits") == 3 * 100 * 51200 * (2 + 8)


def test_stage_ordering_and_rm_doubles_sequences():
    config = _config(POLYGLOT_1_3B)
    settings = FitSettings(quantization="4bit")
    sft, rm, ppo = (estimate(config, stage, settings) for stage in ("sft", "rm", "ppo"))
    assert ppo.total_bytes > sft.total_bytes
    assert ppo.bytes_of("reference_weights") == 0  # LoRA: the policy with its adapter disabled
    full_ppo = estimate(config, "ppo", FitSettings(lora=False))
    assert full_ppo.bytes_of("reference_weights") == full_ppo.bytes_of("policy_weights") == 2 * sft.param_count
    # chosen + rejected in one forward: the reward model's activations at batch b equal 2b sequences'
    cls = model_shape(config, "cls")
    assert rm.bytes_of("activations") == activation_bytes(cls, settings, 2 * 4 * 512, dropout=True)
    assert rm.bytes_of("logits") == 0


def test_total_is_static_plus_largest_phase_plus_overhead():
    result = estimate(_config(POLYGLOT_5_8B), "ppo", FitSettings(quantization="4bit"))
    phases = result.phase_bytes()
    assert set(phases) == {"static", "train", "rollout: generate", "rollout: score"}
    transient = max(total for phase, total in phases.items() if phase != "static")
    assert result.tensor_bytes == phases["static"] + transient
    assert result.total_bytes == result.tensor_bytes + GIB


# --- verdicts --------------------------------------------------------------------------------------


def test_polyglot_12_8b_full_fine_tuning_does_not_fit_24gb():
    config = _config(POLYGLOT_12_8B)
    settings = FitSettings(lora=False)
    result = estimate(config, "sft", settings)
    assert result.total_bytes > GB24
    assert result.bytes_of("optimizer") == 2 * result.bytes_of("gradients") == 4 * result.param_count
    fix = suggest(config, "sft", settings, GB24)
    assert fix is not None and "--load-in-4bit" in fix.flags and fix.estimate.total_bytes <= GB24


def test_polyglot_12_8b_4bit_ppo_fits_24gb_only_with_a_shared_base():
    settings = FitSettings(quantization="4bit", batch_size=1, gradient_checkpointing=True)
    separate = estimate(_config(POLYGLOT_12_8B), "ppo", settings)
    shared = estimate(_config(POLYGLOT_12_8B), "ppo", replace(settings, shared_base=True))
    assert separate.total_bytes > GB24 >= shared.total_bytes
    # Two of the three 4-bit 12.8B weight sets (reward, value) are gone: about 7 GiB each.
    saved = separate.total_bytes - shared.total_bytes
    assert 2 * 7 * GIB < saved < 2 * 7.5 * GIB


def test_polyglot_5_8b_4bit_lora_sft_fits_24gb():
    settings = FitSettings(quantization="4bit", batch_size=1, seq_len=512, gradient_checkpointing=True)
    assert estimate(_config(POLYGLOT_5_8B), "sft", settings).total_bytes <= GB24


def test_knob_is_gradient_checkpointing_when_that_suffices():
    config = _config(POLYGLOT_5_8B)
    settings = FitSettings(quantization="4bit")
    assert estimate(config, "ppo", settings).total_bytes > GB24
    fix = suggest(config, "ppo", settings, GB24)
    assert fix.flags == ("--gradient-checkpointing",)


def test_knob_is_the_largest_batch_that_fits():
    config = _config(POLYGLOT_1_3B)
    settings = FitSettings(lora=False, gradient_checkpointing=True, batch_size=64)
    fix = suggest(config, "sft", settings, GB24)
    size = fix.settings.batch_size
    assert fix.flags == (f"--batch-size {size}",) and 1 <= size < 64
    assert estimate(config, "sft", replace(settings, batch_size=size)).total_bytes <= GB24
    assert estimate(config, "sft", replace(settings, batch_size=size + 1)).total_bytes > GB24


def test_no_knob_when_nothing_can_fit():
    assert suggest(_config(POLYGLOT_12_8B), "ppo", FitSettings(), 8 * GIB) is None


@pytest.mark.parametrize(
    ("stage", "settings", "message"),
    [
        ("grpo", FitSettings(), "stage"),
        ("sft", FitSettings(batch_size=0), "--batch-size"),
        ("sft", FitSettings(quantization="4bit", lora=False), "cannot be fully fine-tuned"),
        ("sft", FitSettings(seq_len=4096), "exceeds"),
        ("ppo", FitSettings(seq_len=1000), "exceeds"),
    ],
)
def test_estimate_rejects_impossible_settings(stage, settings, message):
    with pytest.raises(KochatError, match=message):
        estimate(_config(KOGPT2), stage, settings)


# --- CLI ---------------------------------------------------------------------------------------------


def _cli(capsys, *argv):
    from kochat_trl.cli import main

    code = main(["fit-check", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "no/such-model"], "not a local model folder"),
        (["--model", KOGPT2, "--gpu-memory", "24XB"], "--gpu-memory '24XB'"),
        (["--model", KOGPT2, "--batch-size", "0"], "--batch-size"),
        (["--model", KOGPT2, "--load-in-8bit", "--load-in-4bit"], "choose one"),
        (["--model", KOGPT2, "--load-in-4bit", "--no-lora"], "cannot be fully fine-tuned"),
        (["--model", KOGPT2, "--shared-base"], "does not apply to --stage sft"),
        (["--model", KOGPT2, "--no-lora", "--shared-base", "--stage", "ppo"], "--shared-base puts LoRA adapters"),
    ],
)
def test_cli_bad_inputs_exit_2_with_one_line(capsys, argv, message):
    defaults = [] if "--stage" in argv else ["--stage", "sft"]
    defaults += [] if "--gpu-memory" in argv else ["--gpu-memory", "24GB"]
    code, out, err = _cli(capsys, *argv, *defaults)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("kochat-trl: error: ") and message in err


def test_cli_json_matches_estimate(capsys):
    code, out, _ = _cli(
        capsys, "--model", POLYGLOT_12_8B, "--stage", "sft", "--gpu-memory", "24GB", "--no-lora", "--json"
    )
    payload = json.loads(out)
    expected = estimate(_config(POLYGLOT_12_8B), "sft", FitSettings(lora=False))
    assert code == 0 and payload["fits"] is False and payload["gpu_memory_bytes"] == GB24
    assert payload["total_bytes"] == expected.total_bytes
    assert sum(c["bytes"] for c in payload["components"].values()) + GIB == payload["total_bytes"]
    assert "--load-in-4bit" in payload["suggestion"]["flags"]


def test_cli_table_shows_components_and_verdict(capsys):
    code, out, _ = _cli(
        capsys,
        "--model",
        POLYGLOT_5_8B,
        "--stage",
        "sft",
        "--gpu-memory",
        "24GB",
        "--load-in-4bit",
        "--batch-size",
        "1",
        "--gradient-checkpointing",
    )
    result = estimate(
        _config(POLYGLOT_5_8B), "sft", FitSettings(quantization="4bit", batch_size=1, gradient_checkpointing=True)
    )
    assert code == 0
    assert f"{result.param_count:,} parameters" in out and "logits + loss" in out
    assert f"{result.total_bytes / GIB:.2f}" in out
    assert f"verdict: fits ({(GB24 - result.total_bytes) / GIB:.2f} GiB to spare)" in out


def test_dpo_holds_the_policy_its_reference_and_two_rows_per_pair():
    """fit-check --stage dpo: the policy's training state, a reference that costs nothing under LoRA (the adapter
    disabled) and a full copy otherwise, and chosen + rejected rows in one forward (2 x batch, like SFT with a
    doubled batch), plus the reference's no-grad logits."""
    config = resolve_model_config("EleutherAI/polyglot-ko-1.3b")

    def parts(stage: str, **settings) -> dict[str, int]:
        return {c.key: c.bytes for c in estimate(config, stage, FitSettings(seq_len=256, **settings)).components}

    lora, full = parts("dpo", batch_size=2), parts("dpo", batch_size=2, lora=False)
    sft = parts("sft", batch_size=4)
    assert lora["reference_weights"] == 0 and full["reference_weights"] == full["weights"] > 2 * 10**9
    assert lora["activations"] == sft["activations"] and lora["logits"] == sft["logits"]
    assert {key: lora[key] for key in ("weights", "adapter", "gradients", "optimizer")} == {
        key: sft[key] for key in ("weights", "adapter", "gradients", "optimizer")
    }
    assert lora["reference_logits"] == 2 * 2 * 256 * 30_080 * 2  # tokens x vocab x bf16
