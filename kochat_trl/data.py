"""Korean datasets: read every KoChatGPT-style layout and turn it into what TRL's trainers take.

Layouts are detected by content, not by file extension (KoChatGPT's `.jsonl` files are JSON arrays
and its conversation `.jsonl` is plain text). Every text is Unicode-NFC normalised and stripped;
empty rows, exact duplicates and tied ranking pairs are dropped and counted.

We read local files ourselves instead of through `datasets.load_dataset("json")` because users need
errors that name the line (JSON Lines) or record (array) at fault; hub ids still go through
`datasets.load_dataset`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kochat_trl.errors import DataError
from kochat_trl.outputs import write_text_atomic

if TYPE_CHECKING:
    from datasets import DatasetDict

STAGES = ("sft", "rm", "ppo")
# `bundled:sft` (rm, ppo) names the sample data shipped inside the package.
BUNDLED_PREFIX = "bundled:"
CONVERSATION_MARKER = "<<start conversation>>"
_TURN_RE = re.compile(r"^<(사람|챗봇)>\s*:\s?(.*)$")
_ROLE_OF_SPEAKER = {"사람": "user", "챗봇": "assistant"}


@dataclass
class RawRecord:
    """One record as read, with where it came from (for error messages)."""

    data: Any
    where: str  # "line 12" (JSON Lines / text) or "record 5" (JSON array / hub)


@dataclass
class LoadedData:
    """Rows in one of TRL's formats plus how many were read and dropped."""

    layout: str
    stage: str
    rows: list[dict[str, Any]]
    read: int = 0  # records in the source
    candidates: int = 0  # rows before drops (RM: pairs C(N, 2) per record)
    dropped: dict[str, int] = field(default_factory=lambda: {"empty": 0, "duplicate": 0, "tie": 0})

    @property
    def kept(self) -> int:
        return len(self.rows)

    def summary(self) -> str:
        drops = ", ".join(f"{name} {count}" for name, count in self.dropped.items())
        unit = "pairs" if self.stage == "rm" else "rows"
        return (
            f"layout {self.layout}: read {self.read} records, {self.candidates} candidate {unit}; "
            f"kept {self.kept}; dropped {sum(self.dropped.values())} ({drops})"
        )


# ---------------------------------------------------------------------------------------------
# Reading


def normalize_text(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; pass a data file (JSON, JSON Lines or text)") from None
    try:
        return raw.decode("utf-8-sig")  # KoChatGPT's seed file starts with a BOM
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: byte {error.start}: not UTF-8 text; re-save the file as UTF-8") from None


def bundled_data_path(name: str) -> Path:
    """Path of the Korean sample data shipped with the package: name is sft, rm or ppo."""
    from importlib import resources

    path = Path(str(resources.files("kochat_trl") / "resources" / f"{name}.json"))
    if not path.is_file():
        raise DataError(f"{BUNDLED_PREFIX}{name}: no such bundled data set; use {BUNDLED_PREFIX}sft, rm or ppo")
    return path


def resolve_source(source: str | os.PathLike) -> str | Path:
    """`bundled:NAME` → the packaged file; anything else is returned as given."""
    text = str(source)
    return bundled_data_path(text[len(BUNDLED_PREFIX) :]) if text.startswith(BUNDLED_PREFIX) else source


def read_records(source: str | os.PathLike) -> tuple[list[RawRecord], str]:
    """Read a local file, `bundled:NAME` or a hub dataset id; returns the records and the container kind.

    Container kinds: "json_array", "json_lines", "conversation_text", "text_lines", "hub".
    """
    source = resolve_source(source)
    path = Path(source)
    if not path.exists() and _looks_like_hub_id(str(source)):
        return _read_hub(str(source)), "hub"
    text = _decode(path)
    body = text.lstrip()
    if not body:
        raise DataError(f"{path}: file is empty; it needs at least one record")
    if body.startswith("["):
        return _read_json_array(path, text), "json_array"
    if body.startswith("{"):
        return _read_json_lines(path, text), "json_lines"
    if CONVERSATION_MARKER in text:
        return _read_conversations(path, text), "conversation_text"
    return [RawRecord(line, f"line {n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()], ("text_lines")


def _looks_like_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not source.endswith((".json", ".jsonl", ".txt"))


def _read_hub(dataset_id: str) -> list[RawRecord]:
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, split="train")
    except Exception as error:  # the hub raises many types; all mean "cannot get it"
        raise DataError(
            f"{dataset_id}: not a local file and could not be loaded from the dataset hub ({error}); "
            "check the path, or download the dataset and pass the file"
        ) from None
    return [RawRecord(record, f"record {index}") for index, record in enumerate(dataset)]


def _read_json_array(path: Path, text: str) -> list[RawRecord]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: line {error.lineno} column {error.colno}: invalid JSON ({error.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of records")
    return [RawRecord(record, f"record {index}") for index, record in enumerate(records)]


def _read_json_lines(path: Path, text: str) -> list[RawRecord]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(RawRecord(json.loads(line), f"line {number}"))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}: line {number}: invalid JSON ({error.msg} at column {error.colno}); "
                "each line must be one JSON object"
            ) from None
    return records


def _read_conversations(path: Path, text: str) -> list[RawRecord]:
    """KoChatGPT conversation text: `<<start conversation>>` blocks of `<사람>:` / `<챗봇>:` turns."""
    records: list[RawRecord] = []
    messages: list[dict[str, str]] = []
    start_line = 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped == CONVERSATION_MARKER:
            if start_line:
                records.append(RawRecord(messages, f"line {start_line}"))
            messages, start_line = [], number
        elif not stripped:
            continue
        elif not start_line:
            raise DataError(f"{path}: line {number}: text before the first {CONVERSATION_MARKER}")
        elif match := _TURN_RE.match(stripped):
            messages.append({"role": _ROLE_OF_SPEAKER[match[1]], "content": normalize_text(match[2])})
        elif messages:  # a turn that spans several lines
            messages[-1]["content"] += "\n" + normalize_text(stripped)
        else:
            raise DataError(f"{path}: line {number}: expected a '<사람>:' or '<챗봇>:' turn")
    if start_line:
        records.append(RawRecord(messages, f"line {start_line}"))
    return records


# ---------------------------------------------------------------------------------------------
# Layouts


def detect_layout(records: list[RawRecord], container: str, source: str = "") -> str:
    """One of: sft, rm, pairs, ppo, alpaca, messages, conversation, prompts."""
    if container == "conversation_text":
        return "conversation"
    if container == "text_lines":
        return "prompts"
    first = records[0].data if records else None
    if not isinstance(first, dict):
        raise DataError(f"{source}: {records[0].where if records else 'file'}: expected a JSON object record")
    keys = set(first)
    if "messages" in keys:
        return "messages"
    if "instruction" in keys:
        return "alpaca"
    if {"chosen", "rejected"} <= keys:
        return "pairs"
    if "ranking" in keys or "completion_0" in keys:
        return "rm"
    if "completion" in keys:
        return "sft"
    if "prompt" in keys:
        return "ppo"
    raise DataError(
        f"{source}: {records[0].where}: unknown record layout with keys {sorted(keys)}; expected "
        "prompt/completion (SFT), prompt/completion_0../ranking (RM), prompt/chosen/rejected, prompt (PPO), "
        "instruction/input/output (KoAlpaca, KULLM) or messages"
    )


# Which stages each layout can feed.
_LAYOUT_STAGES = {
    "sft": {"sft", "ppo"},
    "alpaca": {"sft", "ppo"},
    "messages": {"sft", "ppo"},
    "conversation": {"sft", "ppo"},
    "rm": {"rm", "ppo"},
    "pairs": {"rm", "ppo"},
    "ppo": {"ppo"},
    "prompts": {"ppo"},
}


def _text(record: RawRecord, source: str, key: str, required: bool = True) -> str:
    value = record.data.get(key) if isinstance(record.data, dict) else None
    if value is None:
        if not required:
            return ""
        raise DataError(f"{source}: {record.where}: missing key '{key}'")
    if not isinstance(value, str):
        raise DataError(f"{source}: {record.where}: '{key}' must be a string, got {type(value).__name__}")
    return normalize_text(value)


def _messages(record: RawRecord, source: str, raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{source}: {record.where}: 'messages' must be a non-empty list of role/content objects")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{source}: {record.where}: message {index} needs a string 'content'")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise DataError(
                f"{source}: {record.where}: message {index} has role {role!r}; use system, user or assistant"
            )
        messages.append({"role": role, "content": normalize_text(message["content"])})
    return messages


def _ranked_completions(record: RawRecord, source: str) -> tuple[str, list[str], list[int]]:
    if not isinstance(record.data, dict):
        raise DataError(f"{source}: {record.where}: expected a JSON object record")
    prompt = _text(record, source, "prompt")
    count = 0
    while f"completion_{count}" in record.data:
        count += 1
    if count < 2:
        raise DataError(f"{source}: {record.where}: an RM record needs completion_0 and completion_1 at least")
    completions = [_text(record, source, f"completion_{index}") for index in range(count)]
    ranking = record.data.get("ranking")
    if ranking is None:
        raise DataError(f"{source}: {record.where}: missing key 'ranking'")
    if (
        not isinstance(ranking, list)
        or len(ranking) != count
        or not all(isinstance(rank, int) and not isinstance(rank, bool) for rank in ranking)
        or not all(0 <= rank < count for rank in ranking)
    ):
        raise DataError(
            f"{source}: {record.where}: bad ranking {ranking!r}; need {count} integers in 0..{count - 1}, "
            "ranking[i] = rank of completion_i, 0 = best"
        )
    return prompt, completions, ranking


def _rows_of(record: RawRecord, layout: str, stage: str, source: str) -> Iterator[dict[str, Any] | str]:
    """Yield output rows for one record; yield the string "tie" for each tied pair."""
    if layout not in ("prompts", "conversation") and not isinstance(record.data, dict):
        raise DataError(f"{source}: {record.where}: expected a JSON object record, got {type(record.data).__name__}")
    if layout == "prompts":
        yield {"prompt": normalize_text(record.data)}
    elif layout == "conversation":
        messages = record.data
        if not messages:
            raise DataError(f"{source}: {record.where}: conversation has no turns")
        yield from _conversation_rows(messages, stage)
    elif layout == "messages":
        yield from _conversation_rows(_messages(record, source, record.data.get("messages")), stage)
    elif layout in ("sft", "alpaca"):
        if layout == "sft":
            prompt, answer = _text(record, source, "prompt"), _text(record, source, "completion")
        else:
            instruction, extra = _text(record, source, "instruction"), _text(record, source, "input", False)
            prompt = f"{instruction}\n\n{extra}" if instruction and extra else instruction
            answer = _text(record, source, "output")
        yield {"prompt": prompt} if stage == "ppo" else {"prompt": prompt, "completion": answer}
    elif layout == "pairs":
        prompt = _text(record, source, "prompt")
        if stage == "ppo":
            yield {"prompt": prompt}
        else:
            yield {
                "prompt": prompt,
                "chosen": _text(record, source, "chosen"),
                "rejected": _text(record, source, "rejected"),
            }
    elif layout == "rm":
        prompt, completions, ranking = _ranked_completions(record, source)
        if stage == "ppo":
            yield {"prompt": prompt}
            return
        for first, second in itertools.combinations(range(len(completions)), 2):
            if ranking[first] == ranking[second]:
                yield "tie"  # equal ranks carry no preference
                continue
            better, worse = (first, second) if ranking[first] < ranking[second] else (second, first)
            yield {"prompt": prompt, "chosen": completions[better], "rejected": completions[worse]}
    elif layout == "ppo":
        yield {"prompt": _text(record, source, "prompt")}


def _conversation_rows(messages: list[dict[str, str]], stage: str) -> Iterator[dict[str, Any]]:
    if stage == "ppo":
        # The opening question is the prompt; later turns depend on answers the policy did not give.
        users = [index for index, message in enumerate(messages) if message["role"] == "user"]
        if users:
            yield {"prompt": messages[users[0]]["content"]}
        return
    while messages and messages[-1]["role"] != "assistant":
        messages = messages[:-1]  # a trailing user turn has no answer to learn
    yield {"messages": messages}


def _is_empty(row: dict[str, Any]) -> bool:
    for value in row.values():
        if isinstance(value, str) and not value:
            return True
        if isinstance(value, list) and (not value or any(not message["content"] for message in value)):
            return True
    return False


def convert_records(records: list[RawRecord], layout: str, stage: str, source: str = "") -> LoadedData:
    """Turn raw records into TRL-ready rows for `stage`, dropping and counting empty/duplicate/tie."""
    if stage not in STAGES:
        raise DataError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if stage not in _LAYOUT_STAGES[layout]:
        usable = ", ".join(sorted(_LAYOUT_STAGES[layout]))
        raise DataError(f"{source}: layout {layout} cannot feed the {stage} stage (it can feed: {usable})")
    result = LoadedData(layout=layout, stage=stage, rows=[], read=len(records))
    seen: set[str] = set()
    for record in records:
        for row in _rows_of(record, layout, stage, source):
            result.candidates += 1
            if row == "tie":
                result.dropped["tie"] += 1
                continue
            if _is_empty(row):
                result.dropped["empty"] += 1
                continue
            key = json.dumps(row, ensure_ascii=False, sort_keys=True)
            if key in seen:
                result.dropped["duplicate"] += 1
                continue
            seen.add(key)
            result.rows.append(row)
    if not result.rows:
        raise DataError(f"{source}: no usable {stage} rows left ({result.summary()})")
    return result


def load_stage_data(source: str | os.PathLike, stage: str) -> LoadedData:
    """Read `source` (path or hub id) in any supported layout and convert it for `stage`."""
    records, container = read_records(source)
    if not records:
        raise DataError(f"{source}: no records found")
    layout = detect_layout(records, container, str(source))
    return convert_records(records, layout, stage, str(source))


def to_dataset_dict(rows: list[dict[str, Any]], eval_fraction: float, seed: int) -> DatasetDict:
    """Deterministic train/eval split (same rows and seed give the same split on every machine)."""
    from datasets import Dataset, DatasetDict

    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    dataset = Dataset.from_list(rows)
    if eval_fraction == 0:
        return DatasetDict(train=dataset)
    if len(rows) < 2:
        raise DataError(f"{len(rows)} row(s) cannot be split into train and eval; add data or set eval fraction 0")
    eval_count = min(max(round(len(rows) * eval_fraction), 1), len(rows) - 1)
    split = dataset.train_test_split(test_size=eval_count, seed=seed, shuffle=True)
    return DatasetDict(train=split["train"], eval=split["test"])


def write_jsonl(rows: Iterable[dict[str, Any]], output: str | os.PathLike) -> int:
    """Write rows as UTF-8 JSON Lines atomically: no half-written output on failure."""
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    write_text_atomic("".join(lines), output)
    return len(lines)
