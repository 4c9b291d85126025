"""The embedded default: a tiny Korean causal LM that runs every stage offline on a CPU in seconds.

`init_tiny(OUTDIR)` trains a character-level BPE tokenizer with byte fallback on the bundled Korean
sample data (rendered with the prompt template, so the template's markers become single tokens), gives
it that template as its chat template, builds a small Llama from a config, and saves both with
`save_pretrained`: afterwards OUTDIR loads by path exactly like a hub model. Deterministic: the same seed
gives byte-identical files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from kochat_trl.data.readers import bundled_data_path
from kochat_trl.data.templates import answered, get_template, install_template, user_turn
from kochat_trl.run.outputs import atomic_output_dir

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"  # ids 0..3: pad and eos distinct on purpose
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
BYTE_TOKENS = [f"<0x{value:02X}>" for value in range(256)]  # ids 4..259: byte fallback
SPACE = "\u2581"  # "▁", SentencePiece's word-start marker
# A Korean particle (조사) closing a word is a token of its own: the topic is the same token whichever particle
# a question or an answer puts after it (김치에 / 김치는 / 김치를 -> 김치 + particle), a follow-up's 은요/는요
# included (그럼 비빔밥은요? -> 비빔밥 + 은 + 요?).
PARTICLE = r"(?<=[가-힣])((은|는|이|가|을|를|에|의|와|과|로|으로|도)(?=[.,?!]*$)|(은|는)(?=요[.?!]*$))"


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of the embedded default (measured to learn SFT → RM → PPO in seconds on 2 cores)."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 512
    template: str = "kochatgpt_short"


def tokenizer_training_texts(template_name: str) -> list[str]:
    """Every bundled text the tiny model will see, rendered as its chat template renders it. Without eos: a
    special token is matched before BPE runs, so merges across it (`니다.</s>`) could never be used."""
    template = get_template(template_name)
    texts: list[str] = []
    for name in ("sft", "rm", "ppo", "conversations"):
        for record in json.loads(bundled_data_path(name).read_text(encoding="utf-8")):
            if "messages" in record:  # an SFT conversation, answered
                texts.append(template.format_messages(record["messages"], "", add_generation_prompt=False))
                continue
            # the held-out conversations' questions are prompts, like PPO's
            for prompt in record.get("questions", []) or [record["prompt"]]:
                question = user_turn(prompt)
                answers = [value for key, value in record.items() if key.startswith("completion")]
                texts.extend(
                    template.format_messages(answered(question, answer), "", add_generation_prompt=False)
                    for answer in answers
                )
                if not answers:
                    texts.append(template.format_messages(question, ""))
    return texts


def build_tokenizer(spec: TinyModelSpec):
    """A character-level BPE with byte fallback (the Llama / SentencePiece design) trained on the bundled data.

    Every character of the bundled texts is in the vocabulary and frequent words are whole tokens, so a
    model can only ever emit whole Hangul syllables; a character never seen is spelled as its UTF-8 bytes
    (`<0x00>`..`<0xFF>`, ordinary vocabulary entries after the special tokens) and decodes back exactly.
    Words keep their leading space as `▁`; a newline is a token of its own, and the word after it gets a `▁`
    too (removed again when decoding), so a word is the same token at the start of a line (a user prompt
    after `### Instruction(명령어):`) as inside a sentence (an answer): the reward model can see that the
    answer talks about what was asked. For the same reason a particle closing a word is split off (`PARTICLE`).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True))
    core.normalizer = normalizers.Replace("\n", "\n" + SPACE)
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True),
            pre_tokenizers.Split(Regex(PARTICLE), behavior="isolated"),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - len(BYTE_TOKENS), special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    core.train_from_iterator(tokenizer_training_texts(spec.template), trainer=trainer)
    # The trainer knows byte tokens only as added (special) tokens, which decoding with skip_special_tokens
    # would drop: insert them as plain vocabulary entries right after the special tokens instead.
    state = json.loads(core.to_str())
    vocab = state["model"]["vocab"]
    shifted = {
        token: index if index < len(SPECIAL_TOKENS) else index + len(BYTE_TOKENS) for token, index in vocab.items()
    }
    shifted.update({token: len(SPECIAL_TOKENS) + index for index, token in enumerate(BYTE_TOKENS)})
    state["model"]["vocab"] = shifted
    core = Tokenizer.from_str(json.dumps(state))
    core.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\n ", "\n")]
    )
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


def init_tiny(
    output_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False, spec: TinyModelSpec | None = None
) -> Path:
    """Build and save the embedded default model + tokenizer into `output_dir` (atomically)."""
    spec = spec or TinyModelSpec()
    tokenizer = build_tokenizer(spec)
    install_template(tokenizer, spec.template)
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
