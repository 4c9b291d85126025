"""Korean data layouts: detect each KoChatGPT-style record layout, validate it and turn it into TRL rows."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kochat_trl.data.readers import RawRecord, normalize_text, read_records
from kochat_trl.errors import DataError
from kochat_trl.run.outputs import write_text_atomic

if TYPE_CHECKING:
    from datasets import DatasetDict

# Every text is Unicode-NFC normalised and stripped; empty rows, exact duplicates and tied ranking pairs
# are dropped and counted (LoadedData.dropped). Reading the files is kochat_trl.data.readers.
STAGES = ("sft", "rm", "ppo")


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
        if isinstance(record.data, dict) and key in record.data:
            raise DataError(f"{source}: {record.where}: '{key}' is null; give it a string")
        raise DataError(f"{source}: {record.where}: missing key '{key}'")
    if not isinstance(value, str):
        got = f"{type(value).__name__} {json.dumps(value, ensure_ascii=False)[:40]}"
        raise DataError(f"{source}: {record.where}: '{key}' must be a string, got {got}; give it one string")
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
            f"{source}: {record.where}: bad ranking {ranking!r}; it must be a permutation of 0..{count - 1} such as "
            f"{list(range(count))} (ranking[i] = rank of completion_i, 0 = best; equal ranks mark a tie, skipped)"
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
