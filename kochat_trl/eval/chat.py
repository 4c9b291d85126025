"""The terminal chat: a multi-turn conversation with a `Generator` over text streams, history fit to the context."""

from __future__ import annotations

from typing import IO, Any

from kochat_trl.data.templates import Message
from kochat_trl.eval.generation import (
    DECODING_PRESETS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_STRATEGY,
    Generator,
    check_strategies,
)

CHAT_HELP = "commands: /reset (clear history), /strategy NAME (switch decoding), /exit"


def fit_history(generator: Generator, history: list[Message], max_new_tokens: int) -> tuple[str, str | None]:
    """The conversation formatted for the model, and a note when it had to be shortened (else None).

    While the text and `max_new_tokens` would overflow the model's context, the oldest turn is dropped from
    `history` (in place): a question with every answer to it, never part of one, and never the question being
    asked. A leading system turn stays.
    """
    limit = generator.context_limit()
    dropped = 0
    while True:
        text = generator.format(history)
        too_long = limit is not None and len(generator.tokenizer(text)["input_ids"]) + max_new_tokens > limit
        start = 1 if history and history[0]["role"] == "system" else 0
        users = [index for index, message in enumerate(history) if index >= start and message["role"] == "user"]
        if not too_long or len(users) <= 1:
            break
        del history[start : users[1]]  # the oldest question and its answers
        dropped += 1
    if not dropped:
        return text, None
    turns = len([message for message in history if message["role"] == "user"])
    return text, (
        f"(the conversation outgrew the model's context of {limit} tokens with {max_new_tokens} to answer in: "
        f"dropped the oldest {dropped} turn{'s' if dropped > 1 else ''}; the model sees the last {turns})"
    )


def chat_loop(
    generator: Generator,
    input_stream: IO[str],
    output_stream: IO[str],
    strategy: str = DEFAULT_STRATEGY,
    overrides: dict[str, Any] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int | None = 0,
    prompt_marker: str = "> ",
) -> int:
    """Multi-turn chat over text streams until /exit, EOF or Ctrl-C; returns how many answers were given."""
    check_strategies([strategy])
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)  # once: a session is reproducible, yet each turn samples afresh

    def say(text: str) -> None:
        output_stream.write(text + "\n")
        output_stream.flush()

    history: list[Message] = []
    answers = 0
    say(f"chat with template {generator.template_name}, strategy {strategy}; {CHAT_HELP}")
    try:
        while True:
            output_stream.write(prompt_marker)
            output_stream.flush()
            line = input_stream.readline()
            if not line:  # EOF
                say("")
                break
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                break
            if text == "/reset":
                history.clear()
                say("(history cleared)")
            elif text.startswith("/strategy"):
                name = text.removeprefix("/strategy").strip()
                if name in DECODING_PRESETS:
                    strategy = name
                    say(f"(strategy: {strategy})")
                else:
                    say(f"unknown strategy {name!r}; presets: {', '.join(DECODING_PRESETS)}")
            elif text.startswith("/"):
                say(f"unknown command {text.split()[0]!r}; {CHAT_HELP}")
            else:
                history.append({"role": "user", "content": text})
                prompt, note = fit_history(generator, history, max_new_tokens)
                if note:
                    say(note)
                answer = generator.generate([prompt], strategy, overrides, max_new_tokens).answers[0]
                history.append({"role": "assistant", "content": answer})
                answers += 1
                say(answer)
    except KeyboardInterrupt:
        say("")
    return answers
