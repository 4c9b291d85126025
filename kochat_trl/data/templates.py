"""The prompt template, carried by the tokenizer as its chat template.

Training and inference must format prompts identically (a template mismatch silently ruins a model).
So each `PromptTemplate` is rendered once as a Jinja `chat_template`, installed on the tokenizer
(`install_template`) and saved with every tokenizer the project writes. From then on every stage, the
generator, the reward scoring and outside clients (transformers `pipeline`, vLLM, TGI) format
conversations with `tokenizer.apply_chat_template`; `PromptTemplate.format_messages` is the plain-Python
definition the Jinja text is tested against, byte for byte.

A conversation renders as: the system turn (or else the template's preamble), then per turn
`user_format` with the user's text, or `generation_prompt + answer_prefix + answer + eos` for an assistant
answer, followed by `turn_separator` when another turn (or the generation prompt) follows;
`add_generation_prompt` ends the text with `generation_prompt`, ready for the next answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from kochat_trl.errors import ConfigError

Message = dict[str, str]
CHAT = "chat"  # the tokenizer's own chat template (a model that ships one)
DEFAULT_TEMPLATE = "kochatgpt"  # for a model folder that carries no chat template
ROLES = ("system", "user", "assistant")
EXAMPLE_QUESTION, EXAMPLE_ANSWER = "한국의 수도는 어디인가요?", "한국의 수도는 서울입니다."  # for model cards


@dataclass(frozen=True)
class PromptTemplate:
    """KoChatGPT-style instruction markers as a chat format (see the module docstring for the layout)."""

    name: str
    user_format: str = "{prompt}"  # a user turn; `{prompt}` is the user's text
    generation_prompt: str = ""  # opens an assistant answer
    preamble: str = ""  # written first when the conversation has no system turn
    turn_separator: str = "\n\n"
    answer_prefix: str = " "

    def format_messages(
        self, messages: list[Message], eos_token: str, add_generation_prompt: bool = True, bos_token: str = ""
    ) -> str:
        """The conversation as text, exactly as `chat_template` renders it."""
        check_messages(messages)
        before, after = self.user_format.split("{prompt}")
        parts = [bos_token]
        turns = messages
        if messages and messages[0]["role"] == "system":
            parts.append(messages[0]["content"] + self.turn_separator)
            turns = messages[1:]
        else:
            parts.append(self.preamble)
        for index, message in enumerate(turns):
            if message["role"] == "user":
                parts.append(before + message["content"] + after)
            else:
                parts.append(self.generation_prompt + self.answer_prefix + message["content"] + eos_token)
                if index < len(turns) - 1 or add_generation_prompt:
                    parts.append(self.turn_separator)
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)

    def chat_template(self, with_bos: bool = False) -> str:
        """This template as a Jinja chat template (`with_bos`: begin with the tokenizer's bos token)."""
        before, after = self.user_format.split("{prompt}")
        values = {
            "NAME": self.name,
            "BOS": "{{- bos_token -}}\n" if with_bos else "",
            "PREAMBLE": f"{{{{- {_literal(self.preamble)} -}}}}\n" if self.preamble else "",
            "SEPARATOR": _literal(self.turn_separator),
            "USER_BEFORE": _literal(before),
            "USER_AFTER": _literal(after),
            "ANSWER_BEFORE": _literal(self.generation_prompt + self.answer_prefix),
            "GENERATION_PROMPT": _literal(self.generation_prompt),
        }
        return re.sub(r"<(\w+)>", lambda match: values[match[1]], _JINJA)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid Jinja string literal (escapes included)


# <KEY> marks where chat_template writes the template's own strings. The first line keeps the module's old path
# (kochat_trl/templates.py): saved tokenizers carry this text and `saved_template_name` compares it byte for byte.
_JINJA = """\
{#- kochat-trl prompt template '<NAME>' (kochat_trl/templates.py) -#}
<BOS>{%- if messages and messages[0]['role'] == 'system' -%}
{{- messages[0]['content'] + <SEPARATOR> -}}
{%- set turns = messages[1:] -%}
{%- else -%}
<PREAMBLE>{%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
{%- if message['role'] == 'user' -%}
{{- <USER_BEFORE> + message['content'] + <USER_AFTER> -}}
{%- elif message['role'] == 'assistant' -%}
{{- <ANSWER_BEFORE> + message['content'] + eos_token -}}
{%- if not loop.last or add_generation_prompt -%}{{- <SEPARATOR> -}}{%- endif -%}
{%- else -%}
{{- raise_exception('roles must be user or assistant after an optional first system turn, got ' + message['role']) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- <GENERATION_PROMPT> -}}{%- endif -%}
"""


def check_messages(messages: list[Message]) -> None:
    """Roles are user/assistant, with at most one system turn, first; contents are strings."""
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES or (role == "system" and index > 0):
            raise ValueError(
                f"message {index}: roles must be user or assistant after an optional first system turn, got {role!r}"
            )
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {index}: content must be text")


KOCHATGPT_PREAMBLE = (
    "Below is an instruction that describes a task.\n"
    "아래는 작업을 설명하는 명령어입니다.\n\n"
    "Write a response that appropriately completes the request.\n"
    "명령어에 따른 요청을 적절히 완료하는 응답을 작성하세요.\n\n"
)
_KOCHATGPT_USER, _KOCHATGPT_ANSWER = "### Instruction(명령어):\n{prompt}\n\n", "### Response(응답):"

TEMPLATES: dict[str, PromptTemplate] = {
    # The KoChatGPT tutorial's PROMPT_DICT["prompt_no_input"], preamble included.
    "kochatgpt": PromptTemplate("kochatgpt", _KOCHATGPT_USER, _KOCHATGPT_ANSWER, KOCHATGPT_PREAMBLE),
    # Same markers without the preamble: what the embedded tiny default uses (short contexts).
    "kochatgpt_short": PromptTemplate("kochatgpt_short", _KOCHATGPT_USER, _KOCHATGPT_ANSWER),
    # KoAlpaca v1.1 (beomi/KoAlpaca-Polyglot) question/answer markers.
    "koalpaca": PromptTemplate("koalpaca", "### 질문: {prompt}\n\n", "### 답변:"),
    # KULLM (nlpai-lab/KULLM) instruction template.
    "kullm": PromptTemplate(
        "kullm",
        "### 명령어:\n{prompt}\n\n",
        "### 응답:\n",
        "아래는 작업을 설명하는 명령어입니다. 요청을 적절히 완료하는 응답을 작성하세요.\n\n",
        answer_prefix="",
    ),
}
TEMPLATE_NAMES = (*TEMPLATES, CHAT)


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(f"unknown prompt template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}") from None


def check_template_name(name: str | None) -> None:
    """Unknown names fail before any model is loaded (None: the model's saved template)."""
    if name is not None and name != CHAT:
        get_template(name)


# ---------------------------------------------------------------------------------------------
# The template on the tokenizer


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its bos token in front of plain text (Llama-style); the chat template then
    writes it, since text rendered by a chat template is tokenized without special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special, plain = tokenizer("가")["input_ids"], tokenizer("가", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and plain[:1] != [bos]


def saved_template_name(tokenizer: Any) -> str | None:
    """The name of the template the tokenizer carries: a kochat-trl template's name, `chat` for any other chat
    template (a model's own), or None when it has none."""
    saved = getattr(tokenizer, "chat_template", None)
    if not saved:
        return None
    for name, template in TEMPLATES.items():
        if saved in (template.chat_template(False), template.chat_template(True)):
            return name
    return CHAT


def install_template(tokenizer: Any, name: str | None, where: str = "the model folder") -> tuple[str, str | None]:
    """Set `tokenizer.chat_template` for template `name`; returns (resolved name, a note for the user or None).

    `name` None keeps the template the tokenizer carries (else `DEFAULT_TEMPLATE`); `chat` requires the
    tokenizer's own; a kochat-trl template name replaces whatever the tokenizer carried, and says so.
    """
    saved = saved_template_name(tokenizer)
    if name is None:
        if saved is not None:
            return saved, None
        name = DEFAULT_TEMPLATE
        note = f"{where} carries no chat template; formatting prompts with {DEFAULT_TEMPLATE} (set template to choose)"
    elif name == CHAT:
        if saved is None:
            raise ConfigError(
                f"template 'chat' needs a tokenizer with a chat template, and {where} has none; "
                f"pick one of {', '.join(TEMPLATES)}"
            )
        return (saved if saved != CHAT else CHAT), None
    else:
        replaced = saved not in (None, name)
        note = f"template {name} replaces the chat template saved in {where} ({saved})" if replaced else None
    tokenizer.chat_template = get_template(name).chat_template(adds_bos(tokenizer))
    return name, note


def user_turn(prompt: str) -> list[Message]:
    return [{"role": "user", "content": prompt}]


def _conversation(prompt: str | list[Message]) -> list[Message]:
    return user_turn(prompt) if isinstance(prompt, str) else list(prompt)


def prompt_text(tokenizer: Any, prompt: str | list[Message]) -> str:
    """What the model is given before its answer: a user prompt (or a conversation ending in a user turn)
    rendered with the tokenizer's chat template and the generation prompt."""
    return tokenizer.apply_chat_template(_conversation(prompt), tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer: Any, prompt: str | list[Message]) -> list[int]:
    """`prompt_text` as token ids, tokenized as TRL tokenizes conversational prompts (no extra special tokens)."""
    return tokenizer.apply_chat_template(_conversation(prompt), tokenize=True, add_generation_prompt=True)["input_ids"]


def answered_text(tokenizer: Any, messages: list[Message]) -> str:
    """A whole conversation (ending in an answer, and so in eos) as text."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False)


def conversation_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    """A whole conversation (ending in an answer, and so in eos) as token ids: what a reward model scores."""
    return tokenizer.apply_chat_template(list(messages), tokenize=True)["input_ids"]


def answered(prompt: str | list[Message], answer: str) -> list[Message]:
    """The conversation `prompt` followed by `answer` as the assistant's turn."""
    return [*_conversation(prompt), {"role": "assistant", "content": answer}]
