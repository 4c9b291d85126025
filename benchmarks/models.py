"""Model folders and data the benchmarks run on.

- `tiny`: the embedded default (`kochat_trl.models.tiny.init_tiny`).
- `kogpt2-random` and the fit-check presets (`skt/kogpt2-base-v2`, `EleutherAI/polyglot-ko-1.3b`, `-5.8b`,
  `-12.8b`): the real architecture and sizes from `kochat_trl.fitcheck.presets.resolve_model_config`, randomly
  initialised (memory and speed do not depend on weight values) and saved with the embedded tokenizer, so
  every recipe loads them by path like a hub model. The tokenizer only emits ids < 1024; the embeddings and
  logits keep the real vocabulary size, which is what costs memory and time. A random policy rarely emits
  eos, so generation and PPO answers run to their full length: the worst case.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RANDOM_ALIASES = {"kogpt2-random": "skt/kogpt2-base-v2"}
MARKER = "kochat_bench_model.json"


def model_folder(name: str, root: Path, device: str = "cpu") -> Path:
    """A loadable model folder for `name` under `root`, built once and reused (bf16 weights on CUDA)."""
    dtype = "bfloat16" if device == "cuda" else "float32"
    if name == "tiny":
        from kochat_trl.models.tiny import ensure_tiny

        return ensure_tiny(root / "tiny-base", seed=0)
    return random_model(RANDOM_ALIASES.get(name, name), root, device, dtype)


def _slug(preset: str) -> str:
    # Folder names must not contain "kogpt2"/"polyglot-ko": kochat_trl.models.loading.fix_tokenizer applies those
    # checkpoints' tokenizer quirks by name, and this folder holds the embedded tokenizer instead.
    return "random-" + preset.split("/")[-1].replace("kogpt2", "gpt2").replace("polyglot-ko", "gptneox")


def random_model(preset: str, root: Path, device: str = "cpu", dtype: str = "float32") -> Path:
    """Random-init `preset` (a fit-check preset name or config path) + the embedded tokenizer, saved to a folder."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from kochat_trl.data.templates import install_template
    from kochat_trl.fitcheck.presets import resolve_model_config
    from kochat_trl.models.tiny import TinyModelSpec, build_tokenizer
    from kochat_trl.run.outputs import atomic_output_dir

    folder = root / f"{_slug(preset)}-{dtype}"
    if (folder / MARKER).is_file():
        return folder
    spec = TinyModelSpec()
    tokenizer = build_tokenizer(spec)
    install_template(tokenizer, spec.template)
    config = resolve_model_config(preset)
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    # Built on the target device: a 12.8B model initialises in seconds on a GPU, in many minutes on a CPU.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    params = sum(parameter.numel() for parameter in model.parameters())
    with atomic_output_dir(folder, overwrite=True) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps({"preset": preset, "params": params, "dtype": dtype}) + "\n")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def model_params(folder: Path) -> int:
    """Parameters stored in the folder's safetensors files (tied weights stored once)."""
    import math

    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
    return total


def stage_rows(stage: str, config: dict[str, Any], model_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """The exact train (and eval) rows the recipe builds for `stage` from `config` (what bare scripts get)."""
    from trl import ModelConfig

    from kochat_trl.data.stages import prompt_dataset, reward_dataset, sft_dataset
    from kochat_trl.models.loading import load_tokenizer

    split = (config.get("eval_fraction", 0.1), config.get("seed", 42), config.get("max_samples"))
    if stage in ("ppo", "sft"):  # token ids rendered by the model folder's chat template (SFT: with the answer mask)
        side = "left" if stage == "ppo" else "right"
        tokenizer = load_tokenizer(ModelConfig(model_name_or_path=str(model_dir)), side, config.get("template"))
        dataset = {"sft": sft_dataset, "ppo": prompt_dataset}[stage](config["dataset_name"], tokenizer, *split)
    else:  # conversations: the trainer renders them with the model folder's chat template
        dataset = reward_dataset(config["dataset_name"], *split)
    splits = {name: split.to_list() for name, split in dataset.items()}
    if stage == "ppo":  # PPOTrainer takes token ids only; the recipe scores the first eval_prompts held-out rows
        splits["eval"] = splits.get("eval", [])[: config.get("eval_prompts", 64)]
        splits = {name: [{"input_ids": row["input_ids"]} for row in rows] for name, rows in splits.items()}
    return splits


def generation_texts(count: int, model_dir: Path) -> list[str]:
    """`count` bundled prompts rendered by the model folder's chat template (the pipeline's decoding prompts)."""
    from transformers import AutoTokenizer

    from kochat_trl.data.templates import prompt_text
    from kochat_trl.eval.decoding import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = load_prompts("bundled:ppo")
    return [prompt_text(tokenizer, prompts[index % len(prompts)]) for index in range(count)]


# --- fixed-length data (GPU mode: the fit-check estimate assumes every row is exactly seq_len tokens) ---

_WORD_CANDIDATES = tuple(f" {letter}" for letter in "가나다라마바사아자차카타파하abcdefgh")


def _one_token_words(tokenizer: Any) -> list[str]:
    """Space-prefixed words that are one token each however they are strung together (checked)."""
    words = [word for word in _WORD_CANDIDATES if len(tokenizer(word * 5, add_special_tokens=False)["input_ids"]) == 5]
    if len(words) < 2:
        raise RuntimeError("the tokenizer has too few one-token words to build fixed-length rows")
    return words


def _fit(build: Any, count_tokens: Any, target: int) -> str:
    """The text build(k) whose token count is exactly `target` (count grows by one per k)."""
    k = max(target - count_tokens(build(0)), 0)
    for _ in range(8):
        got = count_tokens(build(k))
        if got == target:
            return build(k)
        k = max(k + target - got, 0)
    raise RuntimeError(f"cannot build a row of exactly {target} tokens")


def fixed_length_records(stage: str, model_dir: Path, template: str, seq_len: int, count: int) -> list[dict[str, Any]]:
    """`count` distinct raw records that the recipes turn into rows of exactly `seq_len` tokens.

    The data module drops duplicates, so every record differs (random one-token words). SFT: the completion
    is longer than seq_len and SFTTrainer truncates to max_length = seq_len. RM: the rendered (prompt, answer)
    conversation is exactly seq_len for chosen and rejected (RewardTrainer drops longer rows). PPO: the rendered
    prompt (the query) is exactly seq_len tokens; answers add response_length.
    """
    import random

    from transformers import AutoTokenizer

    from kochat_trl.data.templates import answered, conversation_ids, install_template, prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    install_template(tokenizer, template)
    words = _one_token_words(tokenizer)

    def answer(prompt: str, stream: list[str]) -> str:  # RM: the (prompt, answer) conversation, eos included
        return _fit(
            lambda k: "".join(stream[:k]).strip(),
            lambda text: len(conversation_ids(tokenizer, answered(prompt, text))),
            seq_len,
        )

    def query(prompt: str, stream: list[str]) -> str:  # PPO: the rendered prompt alone
        return _fit(lambda k: prompt + "".join(stream[:k]), lambda text: len(prompt_ids(tokenizer, text)), seq_len)

    records = []
    for index in range(count):
        draw = random.Random(index)
        stream, other = ([draw.choice(words) for _ in range(4 * seq_len)] for _ in range(2))
        prompt = f"설명해 주세요 {index}"
        if stage == "sft":
            records.append({"prompt": prompt, "completion": "".join(stream).strip()})
        elif stage == "rm":
            records.append({"prompt": prompt, "chosen": answer(prompt, stream), "rejected": answer(prompt, other)})
        else:
            records.append({"prompt": query(prompt, stream)})
    return records
