"""What a person reads on the console besides progress bars (kochat_trl.run.progress): notes, result lines, no noise.

Third-party messages that are known and not actionable are filtered here, each by its exact category (or
logger, or printed line) and message, with the reason, so that a new warning still reaches the user.
`--verbose` (recipes and pipeline) keeps the libraries' own console output as it is. Light on purpose:
importing it imports no ML library, so the filters are in place before those libraries load.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from kochat_trl.run.log import get_logger

# (category, message regex, why it is filtered). The message is matched from its start, as `warnings` does; a
# category named "module:Class" is imported when the filters are installed.
KNOWN_WARNINGS: tuple[tuple[type[Warning] | str, str, str], ...] = (
    (
        FutureWarning,
        r"`gradient_checkpointing` is deprecated and will be removed in v6",
        "transformers 5 renamed the TrainingArguments field; TRL 1.12's configs still define the old one",
    ),
    (
        FutureWarning,
        r"`is_gradient_checkpointing` is deprecated and will be removed in v6",
        "peft 0.21 reads the old property when it saves or prepares a model",
    ),
    (
        FutureWarning,
        r"`gradient_checkpointing_(enable|disable)` is deprecated and will be removed in v6",
        "TRL 1.12 turns checkpointing off and on around every rollout, and peft 0.21 on in k-bit preparation, by the "
        "old names; kochat_trl calls activation_checkpointing_enable",
    ),
    (
        UserWarning,
        r"'pin_memory' argument is set as true but no accelerator is found",
        "the Trainer pins memory by default; on a CPU-only machine torch ignores it",
    ),
    (
        "trl.import_utils:TRLExperimentalWarning",
        r"You are importing from 'trl.experimental'",
        "kochat_trl.rl imports TRL 1.12's PPOTrainer from there on purpose; nothing else does",
    ),
    (
        FutureWarning,
        r"`torch.distributed.all_gather_into_tensor` is deprecated",
        "DeepSpeed 0.19's ZeRO calls it (torch 2.13 renamed it); the launched run cannot change that",
    ),
)
# (logger, message regex, why). bitsandbytes comes in through peft's import even when no 8/4-bit is asked for.
KNOWN_LOG_MESSAGES: tuple[tuple[str, str, str], ...] = (
    (
        "bitsandbytes.backends.cpu.ops",
        r"Failed to load CPU gemm_4bit_forward from kernels-community",
        "an optional CPU kernel for 4-bit inference; training and the float paths do not use it",
    ),
    (
        "kernels._internals.hf_hub",
        r"Skipping publisher trust check for '.*' because Hugging Face Hub is in offline mode",
        "bitsandbytes asks the kernels package for its optional CPU kernel; offline (HF_HUB_OFFLINE=1) it is not used",
    ),
    (
        "DeepSpeed",
        r"Setting accelerator to CPU\. If you have GPU",
        "transformers imports DeepSpeed when it is installed; on a CPU run finding no GPU is expected",
    ),
)
# (exact line, why). Printed with print(), so no filter can catch them but a stdout that drops the line.
KNOWN_PRINTS: tuple[tuple[str, str], ...] = (
    ("===training policy===", "TRL 1.12's PPOTrainer announces its training loop"),
)


def known_warnings() -> list[tuple[type[Warning], str, str]]:
    import importlib

    resolved = []
    for category, message, reason in KNOWN_WARNINGS:
        if isinstance(category, str):
            module, _, name = category.partition(":")
            category = getattr(importlib.import_module(module), name)
        resolved.append((category, message, reason))
    return resolved


def note(message: str) -> None:
    """One line to stderr (a note about the run, e.g. the template installed), from the main process only."""
    get_logger().warning(message)


def say(message: str, stream: TextIO | None = None) -> None:
    """One line to stdout, or to `stream` (the stage's progress and result lines), from the main process only."""
    get_logger().info(message, extra={"stream": stream})


def number(value: float | None) -> str:
    """A metric for a result line: three decimals, or n/a when it was not measured."""
    return "n/a" if value is None else f"{value:.3f}"


class _MessageFilter(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


_quiet = False


def quiet_libraries(verbose: bool = False) -> None:
    """Filter the known messages, turn off the libraries' download/loading bars and info logs (once)."""
    global _quiet
    if verbose or _quiet:
        return
    _quiet = True
    install_known_filters()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "LOAD REPORT" of a new reward head, generation-config notes
    hf_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    import datasets

    datasets.disable_progress_bars()  # "Tokenizing train dataset", "Truncating ..."
    datasets.utils.logging.set_verbosity_error()


def install_known_filters() -> None:
    """The KNOWN_WARNINGS and KNOWN_LOG_MESSAGES filters (in the current warnings filter list, and on the loggers)."""
    for category, message, _ in known_warnings():
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, message, _ in KNOWN_LOG_MESSAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(known, _MessageFilter) and known.pattern.pattern == message for known in logger.filters):
            logger.addFilter(_MessageFilter(message))


def interactive(stream: TextIO | None = None) -> bool:
    """A terminal gets a redrawn bar; a file or a CI log gets plain lines."""
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


class _DroppingLines:
    """A text stream that passes everything on but the KNOWN_PRINTS lines (print() writes a line's text and its
    newline separately, so text is held back until its line is complete)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.dropped, self.pending = stream, {line for line, _ in KNOWN_PRINTS}, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line not in self.dropped:
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and self.pending not in self.dropped:
            self.stream.write(self.pending)
        self.pending = ""
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextmanager
def known_prints_dropped() -> Iterator[None]:
    """Inside: stdout drops the KNOWN_PRINTS lines (unless --verbose kept the libraries' output)."""
    if not _quiet:
        yield
        return
    original = sys.stdout
    sys.stdout = dropping = _DroppingLines(original)
    try:
        yield
    finally:
        dropping.flush()
        sys.stdout = original


@contextmanager
def known_warnings_ignored() -> Iterator[None]:
    """The KNOWN_WARNINGS filters for one block (an import that warns once, before any recipe set them)."""
    with warnings.catch_warnings():
        for category, message, _ in known_warnings():
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
