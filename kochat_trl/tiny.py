"""The embedded default: a tiny Korean causal LM that runs every stage offline on a CPU in seconds.

`init_tiny(OUTDIR)` trains a byte-level BPE tokenizer on the bundled Korean sample data (formatted
with the shared prompt template, so the template's markers become single tokens), builds a small
Llama from a config, and saves both with `save_pretrained`: afterwards OUTDIR loads by path exactly
like a hub model. Deterministic: the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from kochat_trl.data import bundled_data_path
from kochat_trl.outputs import atomic_output_dir
from kochat_trl.templates import get_template

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"  # ids 0..3: pad and eos distinct on purpose


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of the embedded default (measured to learn SFT → RM → PPO in seconds on 2 cores)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 512
    template: str = "kochatgpt_short"


def tokenizer_training_texts(template_name: str) -> list[str]:
    """Every bundled text the tiny model will see, formatted as the stages format it."""
    template = get_template(template_name)
    texts: list[str] = []
    for name in ("sft", "rm", "ppo"):
        for record in json.loads(bundled_data_path(name).read_text(encoding="utf-8")):
            prompt = template.format_prompt(record["prompt"])
            answers = [value for key, value in record.items() if key.startswith("completion")]
            texts.extend(prompt + template.format_completion(answer) for answer in answers)
            if not answers:
                texts.append(prompt)
    return texts


def build_tokenizer(spec: TinyModelSpec):
    """A byte-level BPE tokenizer trained on the bundled data, as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(tokenizer_training_texts(spec.template), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=spec.max_position_embeddings,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_model(spec: TinyModelSpec, tokenizer, seed: int):
    """A randomly initialised Llama sized by `spec`; the seed fixes every weight."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=64,
    )
    return model


def init_tiny(output_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False,
              spec: TinyModelSpec | None = None) -> Path:  # fmt: skip
    """Build and save the embedded default model + tokenizer into `output_dir` (atomically)."""
    spec = spec or TinyModelSpec()
    tokenizer = build_tokenizer(spec)
    model = build_model(spec, tokenizer, seed)
    with atomic_output_dir(output_dir, overwrite) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "kochat_tiny.json").write_text(
            json.dumps({"seed": seed, "template": spec.template, **spec.__dict__}, indent=2) + "\n"
        )
    return Path(output_dir)


def ensure_tiny(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the embedded default at `output_dir` unless a finished one is already there."""
    path = Path(output_dir)
    if (path / "kochat_tiny.json").is_file():
        return path
    return init_tiny(path, seed=seed, overwrite=False)
