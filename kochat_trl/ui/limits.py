"""What one request to the web page may ask for: every bound the page puts on untrusted input, checked in one place.

The page's own events and the `/compare` API reach the same functions (`kochat_trl.ui.models`), and a raw client can
call the page's events as the browser does, so the bounds are checked there, not in the components. Each refusal
is a one-line `KochatError` the page shows and the API returns; nothing is generated for a refused request. The
queue's bound is gradio's (`demo.queue(max_size=…)`, `kochat-trl ui --queue-size`).
"""

from __future__ import annotations

import math
from typing import Any

from kochat_trl.errors import KochatError

MAX_PROMPT_CHARS = 2_000  # a prompt or chat message; the tiny model's whole context is 512 tokens
MAX_NEW_TOKENS = 512
MAX_OPTIONS = 8
MAX_OPTIONS_CHARS = 1_000
MAX_HISTORY_MESSAGES = 64  # chat turns kept; older ones would not fit any context and cost a tokenization each
MAX_SEED = 2**32 - 1  # numpy's seed range (transformers.set_seed seeds numpy too)
MAX_DATA_ROWS = 50
DEFAULT_QUEUE_SIZE = 16
# generate() keywords the page passes on, each with its type and range: decoding knobs only. Anything else
# (assistant_model, streamer, custom_generate, cache settings, max_length, ...) can load code, build objects or
# buy unbounded compute; num_beams and min_new_tokens are bounded for the same reason.
GENERATE_OPTIONS: dict[str, tuple[type, float, float]] = {
    "do_sample": (bool, 0, 1),
    "temperature": (float, 0.01, 10.0),
    "top_k": (int, 0, 1_000_000),
    "top_p": (float, 0.0, 1.0),
    "min_p": (float, 0.0, 1.0),
    "typical_p": (float, 0.0, 1.0),
    "repetition_penalty": (float, 0.01, 10.0),
    "no_repeat_ngram_size": (int, 0, 10),
    "num_beams": (int, 1, 8),
    "length_penalty": (float, -10.0, 10.0),
    "early_stopping": (bool, 0, 1),
    "min_new_tokens": (int, 0, MAX_NEW_TOKENS),
}


def check_text(text: str, what: str) -> str:
    """`text` stripped, or a KochatError when it is longer than the page answers."""
    text = text.strip()
    if len(text) > MAX_PROMPT_CHARS:
        raise KochatError(
            f"the {what} has {len(text):,} characters; this page takes at most {MAX_PROMPT_CHARS:,} "
            "(shorten it, or use kochat-trl generate on your own machine)"
        )
    return text


def _whole(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value != int(value):
        raise KochatError(f"{what} must be a whole number in {low}..{high}, got {value!r}")
    if not low <= int(value) <= high:
        raise KochatError(f"{what} must be in {low}..{high}, got {int(value)}")
    return int(value)


def check_numbers(max_new_tokens: Any, seed: Any) -> tuple[int, int]:
    """(max_new_tokens, seed) as whole numbers within the page's bounds."""
    return _whole(max_new_tokens, "max new tokens", 1, MAX_NEW_TOKENS), _whole(seed, "seed", 0, MAX_SEED)


def check_rows(count: Any) -> int:
    return _whole(count, "rows per stage", 1, MAX_DATA_ROWS)


def check_options_text(text: str) -> list[str]:
    """The `KEY=VALUE` items of the options box (one per line or comma-separated), at most MAX_OPTIONS of them."""
    if len(text) > MAX_OPTIONS_CHARS:
        raise KochatError(
            f"the generate options have {len(text):,} characters; this page takes at most {MAX_OPTIONS_CHARS:,}"
        )
    items = [item.strip() for line in text.splitlines() for item in line.split(",") if item.strip()]
    if len(items) > MAX_OPTIONS:
        raise KochatError(f"{len(items)} generate options given; this page takes at most {MAX_OPTIONS}")
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep:
            raise KochatError(f"generate option {item!r}: expected KEY=VALUE, e.g. repetition_penalty=1.2")
        _check_key(key.strip())
    return items


def _check_key(key: str) -> None:
    if key not in GENERATE_OPTIONS:
        raise KochatError(
            f"generate option {key!r} is not one this page passes on; it takes {', '.join(GENERATE_OPTIONS)}"
        )


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """`options` when every key is an allowed generate() keyword and every value has its type and range."""
    if len(options) > MAX_OPTIONS:
        raise KochatError(f"{len(options)} generate options given; this page takes at most {MAX_OPTIONS}")
    for key, value in options.items():
        _check_key(key)
        kind, low, high = GENERATE_OPTIONS[key]
        if kind is bool:
            if not isinstance(value, bool):
                raise KochatError(f"generate option {key}={value!r} must be true or false")
        elif kind is int:
            _whole(value, f"generate option {key}", int(low), int(high))
        elif isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise KochatError(f"generate option {key}={value!r} must be a number in {low:g}..{high:g}")
    return options
