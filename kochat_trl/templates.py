"""The one prompt template shared by SFT, reward modelling, PPO and generation.

Training and inference must format prompts identically (a template mismatch silently ruins a
model), so every stage asks `get_template(name)` for the same object and calls its methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Message = dict[str, str]


@dataclass(frozen=True)
class PromptTemplate:
    """Wraps a user prompt into what the model sees before its answer.

    `prompt_format` holds a `{prompt}` placeholder; `preamble` is written once before the first
    turn; a multi-turn conversation repeats `prompt_format` + answer + `turn_separator` per turn.
    `name == "chat"` means: use the tokenizer's own chat template instead.
    """

    name: str
    prompt_format: str = "{prompt}"
    preamble: str = ""
    turn_separator: str = "\n\n"
    answer_prefix: str = " "

    @property
    def uses_chat_template(self) -> bool:
        return self.name == "chat"

    def format_prompt(self, prompt: str, tokenizer: Any = None) -> str:
        """The text the model is given for a single-turn `prompt`."""
        return self.format_messages([{"role": "user", "content": prompt}], tokenizer)

    def format_messages(self, messages: list[Message], tokenizer: Any = None) -> str:
        """Render a conversation that ends with a user turn, ready for the next assistant answer."""
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("a prompt conversation must end with a user turn")
        if self.uses_chat_template:
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError(
                    "template 'chat' needs a tokenizer with a chat template; "
                    "pick another template (kochatgpt, koalpaca, kullm)"
                )
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = [self.preamble] if self.preamble else []
        for message in messages:
            if message["role"] == "system":
                parts.append(message["content"] + self.turn_separator)
            elif message["role"] == "user":
                parts.append(self.prompt_format.format(prompt=message["content"]))
            else:
                parts.append(self.format_completion(message["content"]) + self.turn_separator)
        return "".join(parts)

    def split_conversation(self, messages: list[Message], tokenizer: Any = None) -> dict[str, str]:
        """A multi-turn conversation as `{"prompt", "completion"}` (loss on the last answer only)."""
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ValueError("a training conversation must end with an assistant turn")
        return {
            "prompt": self.format_messages(messages[:-1], tokenizer),
            "completion": self.format_completion(messages[-1]["content"]),
        }

    def format_completion(self, answer: str) -> str:
        """The answer text as it follows the prompt (eos is the tokenizer's business)."""
        return answer if self.uses_chat_template else self.answer_prefix + answer


KOCHATGPT_PREAMBLE = (
    "Below is an instruction that describes a task.\n"
    "아래는 작업을 설명하는 명령어입니다.\n\n"
    "Write a response that appropriately completes the request.\n"
    "명령어에 따른 요청을 적절히 완료하는 응답을 작성하세요.\n\n"
)

TEMPLATES: dict[str, PromptTemplate] = {
    # The KoChatGPT tutorial's PROMPT_DICT["prompt_no_input"], preamble included.
    "kochatgpt": PromptTemplate(
        "kochatgpt", "### Instruction(명령어):\n{prompt}\n\n### Response(응답):", KOCHATGPT_PREAMBLE
    ),
    # Same markers without the preamble: what the embedded tiny default uses (short contexts).
    "kochatgpt_short": PromptTemplate("kochatgpt_short", "### Instruction(명령어):\n{prompt}\n\n### Response(응답):"),
    # KoAlpaca v1.1 (beomi/KoAlpaca-Polyglot) question/answer markers.
    "koalpaca": PromptTemplate("koalpaca", "### 질문: {prompt}\n\n### 답변:"),
    # KULLM (nlpai-lab/KULLM) instruction template.
    "kullm": PromptTemplate(
        "kullm",
        "### 명령어:\n{prompt}\n\n### 응답:\n",
        "아래는 작업을 설명하는 명령어입니다. 요청을 적절히 완료하는 응답을 작성하세요.\n\n",
        answer_prefix="",
    ),
    "chat": PromptTemplate("chat"),
}


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt template {name!r}; choose one of {', '.join(TEMPLATES)}") from None
