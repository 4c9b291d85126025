"""kochat_trl.models.loading on tiny models built from configs (no hub): LoRA targets, tokenizer fixes,
from_pretrained kwargs, and real 8-bit/4-bit LoRA training steps on CPU with bitsandbytes."""

from __future__ import annotations

import sys

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    OPTForSequenceClassification,
    PreTrainedTokenizerFast,
)
from trl import ModelConfig

from kochat_trl.errors import ConfigError
from kochat_trl.models.loading import (
    disable_bnb_cpu_bf16_repack,
    fix_tokenizer,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    model_init_kwargs,
    trainable_parameter_share,
)
from kochat_trl.models.lora import build_peft_config, lora_target_modules

bnb = pytest.importorskip("bitsandbytes")

HIDDEN, LAYERS, LORA_R = 64, 2, 4
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
WORDS = ["안녕", "하세요", "저는", "한국어", "모델", "입니다", "질문", "답변", "좋아요", "감사"]


def make_tokenizer(tokens: list[str], **special_tokens: str) -> PreTrainedTokenizerFast:
    core = Tokenizer(WordLevel({token: index for index, token in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, **special_tokens)


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=64,
    )


def tiny_gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, vocab_size=300, n_positions=64))


def tiny_gpt_neox() -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        vocab_size=300,
        max_position_embeddings=64,
    )
    return GPTNeoXForCausalLM(config)


def tiny_opt(model_class=OPTForCausalLM):
    config = OPTConfig(hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=300)
    return model_class(config)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama (vocab 300) with a tokenizer whose pad already differs from eos: no resizing."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(tiny_llama_config(vocab_size=300)).save_pretrained(path)
    tokens = ["<unk>", "<s>", "</s>", "<pad>", *WORDS]
    make_tokenizer(tokens, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>").save_pretrained(
        path
    )
    return path


def lora_leaf_names(model) -> list[str]:
    return [name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, LoraLayer)]


# --- LoRA targets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build_model", "expected"),
    [
        (tiny_gpt2, ["c_attn"]),
        (tiny_gpt_neox, ["query_key_value"]),
        (lambda: LlamaForCausalLM(tiny_llama_config(300)), QKVO),
    ],
    ids=["gpt2", "gpt_neox", "llama"],
)
def test_lora_targets_per_architecture_wrap_exactly_those_modules(build_model, expected):
    model = build_model()
    assert lora_target_modules(model.config) == expected
    assert lora_target_modules(model) == expected

    peft_config = build_peft_config(ModelConfig(use_peft=True, lora_r=LORA_R), model, "CAUSAL_LM")
    assert peft_config.target_modules == set(expected)
    assert peft_config.task_type == "CAUSAL_LM"
    assert peft_config.r == LORA_R

    wrapped = lora_leaf_names(get_peft_model(model, peft_config))
    assert len(wrapped) == LAYERS * len(expected)
    assert sorted(set(wrapped)) == sorted(expected)


def test_unknown_architecture_targets_every_linear_but_the_heads():
    expected = ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]  # OPT: not in the table
    assert lora_target_modules(tiny_opt()) == expected  # lm_head left out
    assert lora_target_modules(tiny_opt(OPTForSequenceClassification)) == expected  # score left out

    with pytest.raises(ConfigError, match="lora_target_modules"):
        lora_target_modules(OPTConfig())


def test_user_targets_win_and_a_single_target_is_not_a_regex():
    model = LlamaForCausalLM(tiny_llama_config(300))
    # ModelConfig turns ["q_proj"] into "q_proj", which peft would read as a full-name regex (no match).
    model_args = ModelConfig(use_peft=True, lora_r=LORA_R, lora_target_modules=["q_proj"])
    assert model_args.lora_target_modules == "q_proj"
    peft_config = build_peft_config(model_args, model, "CAUSAL_LM")
    assert peft_config.target_modules == {"q_proj"}
    assert lora_leaf_names(get_peft_model(model, peft_config)) == ["q_proj"] * LAYERS

    two = build_peft_config(ModelConfig(use_peft=True, lora_target_modules=["q_proj", "v_proj"]), model, "CAUSAL_LM")
    assert two.target_modules == {"q_proj", "v_proj"}
    everything = build_peft_config(ModelConfig(use_peft=True, lora_target_modules=["all-linear"]), model, "CAUSAL_LM")
    assert everything.target_modules == "all-linear"


def test_seq_cls_config_saves_the_score_head_and_leaves_model_args_alone():
    model_args = ModelConfig(use_peft=True, lora_modules_to_save=["embed_tokens"])
    peft_config = build_peft_config(model_args, tiny_llama_config(300), "SEQ_CLS")
    assert peft_config.task_type == "SEQ_CLS"
    assert set(peft_config.modules_to_save) == {"embed_tokens", "score"}
    assert peft_config.target_modules == set(QKVO)
    # The caller's ModelConfig is not mutated.
    assert model_args.lora_modules_to_save == ["embed_tokens"]
    assert model_args.lora_task_type == "CAUSAL_LM"
    assert model_args.lora_target_modules is None


def test_build_peft_config_off_and_bad_task_type():
    assert build_peft_config(ModelConfig(use_peft=False), tiny_llama_config(300), "CAUSAL_LM") is None
    with pytest.raises(ConfigError, match="task_type"):
        build_peft_config(ModelConfig(use_peft=True), tiny_llama_config(300), "TOKEN_CLS")


# --- tokenizer fixes -----------------------------------------------------------------------------------


def test_pad_equal_to_eos_gets_a_new_distinct_pad():
    tokenizer = make_tokenizer(["<unk>", "<s>", "</s>", *WORDS], eos_token="</s>", pad_token="</s>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    fix_tokenizer(tokenizer)
    assert tokenizer.eos_token_id == 2
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id == 3 + len(WORDS)  # appended after the original vocabulary
    assert len(tokenizer) == 4 + len(WORDS)


def test_missing_pad_reuses_an_existing_pad_token():
    tokenizer = make_tokenizer(["<unk>", "<|endoftext|>", "<|pad|>", *WORDS], eos_token="<|endoftext|>")
    assert tokenizer.pad_token is None
    fix_tokenizer(tokenizer)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|pad|>", 2)
    assert len(tokenizer) == 3 + len(WORDS)  # nothing added, nothing to resize


def test_kogpt2_name_sets_its_special_tokens():
    # skt/kogpt2-base-v2's vocabulary starts like this, but its tokenizer declares no special tokens.
    tokens = ["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>", *WORDS]
    tokenizer = make_tokenizer(tokens)
    fix_tokenizer(tokenizer, "gpt2", "skt/kogpt2-base-v2")
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("</s>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 1)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 5)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 3)
    assert (tokenizer.mask_token, tokenizer.mask_token_id) == ("<mask>", 6)
    assert len(tokenizer) == len(tokens)


def test_polyglot_ko_uses_endoftext_as_eos():
    tokens = ["<|unused0|>", "<|unused1|>", "<|endoftext|>", "<unk>", *WORDS]
    tokenizer = make_tokenizer(tokens, unk_token="<unk>")
    fix_tokenizer(tokenizer, "gpt_neox", "EleutherAI/polyglot-ko-1.3b")
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", 2)
    assert tokenizer.pad_token_id not in (None, 2)


def test_loaders_resize_embeddings_for_an_added_pad(tmp_path):
    vocab = ["<unk>", "<s>", "</s>", *WORDS]
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(vocab))).save_pretrained(tmp_path)
    make_tokenizer(vocab, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path)
    model_args = ModelConfig(model_name_or_path=str(tmp_path))

    tokenizer = load_tokenizer(model_args, padding_side="left")
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id == len(vocab)  # one new token...
    model = load_causal_lm(model_args, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(vocab) + 1  # ...and a row for it
    assert model.get_output_embeddings().weight.shape[0] == len(vocab) + 1
    assert model.config.pad_token_id == model.generation_config.pad_token_id == len(vocab)

    reward_model = load_reward_model(model_args, tokenizer, num_labels=1)
    assert reward_model.get_input_embeddings().weight.shape[0] == len(vocab) + 1
    assert reward_model.config.pad_token_id == len(vocab)
    batch = tokenizer(["안녕 하세요", "저는 한국어 모델 입니다"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0].item() == len(vocab)  # left padding with the new id
    assert reward_model(**batch).logits.shape == (2, 1)


def test_load_tokenizer_applies_kogpt2_fixes_by_path(tmp_path):
    path = tmp_path / "kogpt2-base-v2"
    tiny_gpt2().save_pretrained(path)
    tokens = ["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>", *WORDS]
    make_tokenizer(tokens).save_pretrained(path)
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=str(path)))
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.padding_side) == (1, 3, "right")


@pytest.mark.parametrize("loader", [load_tokenizer, lambda args: load_causal_lm(args, tokenizer=None)])
def test_loaders_need_a_model_path(loader):
    with pytest.raises(ConfigError, match="model_name_or_path"):
        loader(ModelConfig())


# --- from_pretrained kwargs ----------------------------------------------------------------------------


def test_model_init_kwargs_without_quantization():
    kwargs = model_init_kwargs(ModelConfig(model_name_or_path="x", dtype="bfloat16", model_revision="v1"))
    assert kwargs == {"dtype": torch.bfloat16, "revision": "v1", "trust_remote_code": False}
    assert model_init_kwargs(ModelConfig(dtype="auto"))["dtype"] == "auto"
    assert model_init_kwargs(ModelConfig(attn_implementation="sdpa"))["attn_implementation"] == "sdpa"
    with pytest.raises(ConfigError, match="dtype"):
        model_init_kwargs(ModelConfig(dtype="float64"))


def test_model_init_kwargs_quantized():
    four_bit = model_init_kwargs(ModelConfig(load_in_4bit=True, dtype="bfloat16"))
    config = four_bit["quantization_config"]
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.bnb_4bit_quant_type == "nf4"
    assert four_bit["device_map"] is None  # CPU: no per-process placement
    eight_bit = model_init_kwargs(ModelConfig(load_in_8bit=True))
    assert eight_bit["quantization_config"].load_in_8bit
    # trl would crash on torch.auto; "auto" picks the compute dtype of the hardware.
    auto = model_init_kwargs(ModelConfig(load_in_4bit=True, dtype="auto"))
    assert auto["dtype"] == "auto"
    assert auto["quantization_config"].bnb_4bit_compute_dtype == torch.float32


def test_kbit_device_map_is_the_local_process_under_multi_gpu(monkeypatch):
    import accelerate

    class ThirdProcess:
        local_process_index = 3

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(accelerate, "PartialState", ThirdProcess)
    assert model_init_kwargs(ModelConfig(load_in_8bit=True))["device_map"] == {"": 3}


def test_8bit_and_4bit_together_is_a_config_error():
    model_args = ModelConfig(load_in_8bit=True)
    model_args.load_in_4bit = True  # ModelConfig's own check only runs at construction (as ValueError)
    with pytest.raises(ConfigError, match="load_in_8bit.*load_in_4bit"):
        model_init_kwargs(model_args)


def test_quantization_without_bitsandbytes_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install bitsandbytes.*load_in_4bit: false"):
        model_init_kwargs(ModelConfig(load_in_4bit=True))


# --- quantized LoRA training on CPU --------------------------------------------------------------------

INPUT_IDS = torch.tensor([[4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 4, 5]])


def reward_pair_loss(model) -> torch.Tensor:
    rewards = model(input_ids=INPUT_IDS).logits.squeeze(-1)
    return -torch.nn.functional.logsigmoid(rewards[0] - rewards[1])


def causal_lm_loss(model) -> torch.Tensor:
    return model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss


def lora_b_grads_after_inference_then_step(peft_model, loss_fn) -> tuple[dict, dict]:
    """The trap's order: one no-grad eval forward, then a training step. Returns grads and weight changes."""
    peft_model.eval()
    with torch.no_grad():
        loss_fn(peft_model)
    peft_model.train()
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    loss = loss_fn(peft_model)
    assert torch.isfinite(loss)
    loss.backward()
    grads = {name: p.grad.abs().sum().item() for name, p in trainable.items()}
    optimizer.step()
    changes = {name: (p.detach() - before[name]).abs().max().item() for name, p in trainable.items()}
    return grads, changes


@pytest.mark.parametrize(
    ("bits", "task_type", "gradient_checkpointing"),
    [(8, "CAUSAL_LM", False), (4, "CAUSAL_LM", False), (4, "CAUSAL_LM", True), (4, "SEQ_CLS", False)],
    ids=["8bit-causal", "4bit-causal", "4bit-causal-checkpointing", "4bit-reward"],
)
def test_quantized_lora_trains_every_adapter(llama_dir, bits, task_type, gradient_checkpointing):
    torch.manual_seed(0)
    model_args = ModelConfig(
        model_name_or_path=str(llama_dir),
        load_in_8bit=bits == 8,
        load_in_4bit=bits == 4,
        use_peft=True,
        lora_r=LORA_R,
        lora_dropout=0.0,
    )
    tokenizer = load_tokenizer(model_args)
    if task_type == "SEQ_CLS":
        model = load_reward_model(model_args, tokenizer, gradient_checkpointing=gradient_checkpointing)
        loss_fn = reward_pair_loss
    else:
        model = load_causal_lm(model_args, tokenizer, gradient_checkpointing=gradient_checkpointing)
        loss_fn = causal_lm_loss
    quantized_class = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert sum(isinstance(m, quantized_class) for m in model.modules()) == LAYERS * 7  # q k v o gate up down
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == gradient_checkpointing

    peft_model = get_peft_model(model, build_peft_config(model_args, model, task_type))
    grads, changes = lora_b_grads_after_inference_then_step(peft_model, loss_fn)

    lora_b = [name for name in grads if "lora_B" in name]
    assert len(lora_b) == LAYERS * len(QKVO)
    # Every adapter, not just the sum: with the bnb CPU trap, q/k/v get exactly 0 while o_proj trains.
    assert {name: grads[name] > 0 for name in lora_b} == dict.fromkeys(lora_b, True)
    assert min(changes[name] for name in lora_b) > 0
    if bits == 4:
        assert not any(
            getattr(m.weight.quant_state, "packing_format_for_cpu", False)
            for m in peft_model.modules()
            if isinstance(m, bnb.nn.Linear4bit)
        )

    lora_parameters = LAYERS * len(QKVO) * 2 * LORA_R * HIDDEN  # A (r x 64) + B (64 x r) per module
    trainable, total = trainable_parameter_share(peft_model)
    if task_type == "SEQ_CLS":
        score = [name for name in changes if "score" in name]
        assert score and all(changes[name] > 0 for name in score)  # the reward head trains too
        assert trainable == lora_parameters + HIDDEN  # plus the trainable copy of score (1 x 64)
    else:
        assert trainable == lora_parameters
    assert trainable < total
    assert (trainable, total) == peft_model.get_nb_trainable_parameters()


def test_bnb_cpu_repack_trap_and_its_undo(llama_dir):
    """Without the guard, one inference forward on this CPU zeroes q/k/v LoRA gradients (bnb 0.50)."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    torch.manual_seed(0)
    model_args = ModelConfig(
        model_name_or_path=str(llama_dir), load_in_4bit=True, use_peft=True, lora_r=LORA_R, lora_dropout=0.0
    )
    # Load without the kochat loaders, i.e. without the guard.
    from peft import prepare_model_for_kbit_training

    model = AutoModelForCausalLM.from_pretrained(str(llama_dir), **model_init_kwargs(model_args))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, build_peft_config(model_args, model, "CAUSAL_LM"))
    grads, _ = lora_b_grads_after_inference_then_step(peft_model, causal_lm_loss)
    zero = sorted({name.split(".")[-4] for name, grad in grads.items() if "lora_B" in name and grad == 0})
    if not zero:
        pytest.skip("this bitsandbytes no longer breaks gradients after CPU repacking")
    assert zero == ["k_proj", "q_proj", "v_proj"]  # o_proj still trains: a summed check would miss it

    # The guard switches off all 14 Linear4bit layers and unpacks the weights already repacked.
    assert disable_bnb_cpu_bf16_repack(peft_model) == LAYERS * 7
    assert disable_bnb_cpu_bf16_repack(peft_model) == 0  # idempotent
    peft_model.zero_grad()
    grads, changes = lora_b_grads_after_inference_then_step(peft_model, causal_lm_loss)
    assert all(grads[name] > 0 and changes[name] > 0 for name in grads if "lora_B" in name)


def test_disable_repack_is_a_no_op_on_unquantized_models():
    assert disable_bnb_cpu_bf16_repack(LlamaForCausalLM(tiny_llama_config(300))) == 0
