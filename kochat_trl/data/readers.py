"""Reading data sources into raw records: JSON array, JSON Lines, KoChatGPT conversation text, hub, bundled."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kochat_trl.errors import DataError

# We read local files ourselves instead of through `datasets.load_dataset("json")` because users need
# errors that name the line (JSON Lines) or record (array) at fault; hub ids still go through
# `datasets.load_dataset`. The container is detected by content, not by file extension (KoChatGPT's
# `.jsonl` files are JSON arrays and its conversation `.jsonl` is plain text).

# `bundled:sft` (rm, ppo) names the sample data shipped inside the package.
BUNDLED_PREFIX = "bundled:"
CONVERSATION_MARKER = "<<start conversation>>"
_TURN_RE = re.compile(r"^<(사람|챗봇)>\s*:\s?(.*)$")
_ROLE_OF_SPEAKER = {"사람": "user", "챗봇": "assistant"}
# C0 control characters other than tab, newline and carriage return: NUL and the rest are never text (a binary
# file read as text, a broken export) and would reach the tokenizer as invisible tokens.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# No text field may be longer: about 25,000+ tokens, beyond the context of every model these recipes train, so
# the trainer would keep only its first max_length tokens; refused up front because tokenising a 10 MB text
# (for the length checks and PPO's prompt ids) takes minutes, and such a record is nearly always a broken export.
MAX_TEXT_CHARS = 100_000


@dataclass
class RawRecord:
    """One record as read, with where it came from (for error messages)."""

    data: Any
    where: str  # "line 12" (JSON Lines / text) or "record 5" (JSON array / hub)


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
        text = raw.decode("utf-8-sig")  # KoChatGPT's seed file starts with a BOM
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        bad = raw[error.start : error.end].hex(" ")
        raise DataError(
            f"{path}: line {line} (byte {error.start}: {bad}): not UTF-8 text; re-save the file as UTF-8 "
            "(Korean files from Windows are often CP949: iconv -f cp949 -t utf-8)"
        ) from None
    if match := _CONTROL_RE.search(text):
        line, column = _line_column(text, match.start())
        raise DataError(
            f"{path}: line {line} column {column}: control character U+{ord(match[0]):04X} in the text; "
            "remove it (only tab, newline and carriage return may appear)"
        )
    return text


def _line_column(text: str, position: int) -> tuple[int, int]:
    return text.count("\n", 0, position) + 1, position - text.rfind("\n", 0, position)


def _check_strings(source: str | os.PathLike, record: RawRecord) -> None:
    """Every string in a record (JSON escapes such as \\u0000 included): no control character, no giant text."""
    # A conversation-text record is its list of turns: named `messages[1].content` as in the messages layout.
    pending = deque([("messages" if isinstance(record.data, list) else "", record.data)])
    while pending:
        name, value = pending.popleft()
        if isinstance(value, dict):
            pending.extend((f"{name}.{key}" if name else str(key), item) for key, item in value.items())
        elif isinstance(value, list):
            pending.extend((f"{name}[{index}]", item) for index, item in enumerate(value))
        elif isinstance(value, str):
            field = f"'{name}'" if name else "the text"
            if len(value) > MAX_TEXT_CHARS:
                raise DataError(
                    f"{source}: {record.where}: {field} is {len(value):,} characters long, over the "
                    f"{MAX_TEXT_CHARS:,} a text may hold (beyond any model's context; training keeps only max_length "
                    "tokens); shorten the record or drop it"
                )
            if match := _CONTROL_RE.search(value):
                raise DataError(
                    f"{source}: {record.where}: {field} holds control character U+{ord(match[0]):04X}; "
                    "remove it (only tab, newline and carriage return may appear)"
                )


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
    records, container = _read_container(source)
    for record in records:
        _check_strings(source, record)
    return records, container


def _read_container(source: str | os.PathLike) -> tuple[list[RawRecord], str]:
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
        line, column, problem = _json_problem(error)
        raise DataError(f"{path}: line {line} column {column}: invalid JSON ({problem})") from None
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
            _, column, problem = _json_problem(error)
            raise DataError(
                f"{path}: line {number}: invalid JSON ({problem} at column {column}); each line must be one JSON object"
            ) from None
    return records


def _json_problem(error: json.JSONDecodeError) -> tuple[int, int, str]:
    """Line, column and wording of a JSON error; a trailing comma (which JSON forbids, and Python 3.11 reports as
    "Expecting value") is named as such, at the comma."""
    before = error.doc[: error.pos].rstrip()
    after = error.doc[error.pos : error.pos + 1]
    if before.endswith(",") and after in ("]", "}"):
        line, column = _line_column(error.doc, len(before) - 1)
        return line, column, f"trailing comma before '{after}'; remove the comma"
    return error.lineno, error.colno, error.msg


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
