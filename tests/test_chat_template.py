"""The prompt template is the tokenizer's chat template: the Jinja text renders exactly what
`PromptTemplate.format_messages` defines, travels with save_pretrained, and is installed / kept / replaced
as asked."""

from __future__ import annotations

import itertools

import pytest
from transformers import AutoTokenizer

from kochat_trl.data.templates import (
    CHAT,
    TEMPLATES,
    install_template,
    prompt_ids,
    prompt_text,
    saved_template_name,
)
from kochat_trl.errors import ConfigError

USER, ANSWER = {"role": "user", "content": "김치는 무엇인가요?"}, {"role": "assistant", "content": "김치는 음식입니다."}
SYSTEM = {"role": "system", "content": "당신은 친절한 한국어 비서입니다."}
CONVERSATIONS = {
    "single-turn": [USER],
    "answered": [USER, ANSWER],
    "multi-turn": [USER, ANSWER, {"role": "user", "content": "더 알려 주세요.\n두 줄로요."}],
    "multi-turn answered": [USER, ANSWER, {"role": "user", "content": "더요?"}, {**ANSWER, "content": "네."}],
    "system": [SYSTEM, USER],
    "system multi-turn": [SYSTEM, USER, ANSWER, {"role": "user", "content": "고마워요."}],
}


@pytest.fixture()
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize(
    ("name", "conversation", "generation_prompt", "with_bos"),
    list(itertools.product(TEMPLATES, CONVERSATIONS, (True, False), (False, True))),
)
def test_apply_chat_template_reproduces_format_messages_byte_for_byte(
    tokenizer, name, conversation, generation_prompt, with_bos
):
    template = TEMPLATES[name]
    tokenizer.chat_template = template.chat_template(with_bos)
    messages = CONVERSATIONS[conversation]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    expected = template.format_messages(
        messages, tokenizer.eos_token, generation_prompt, tokenizer.bos_token if with_bos else ""
    )
    assert rendered == expected


def test_the_rendered_text_is_kochatgpts_format(tokenizer):
    """Spelled out once, independently of format_messages: the KoChatGPT prompt, answers ending in eos."""
    tokenizer.chat_template = TEMPLATES["kochatgpt"].chat_template()
    conversation = [USER, ANSWER, {"role": "user", "content": "더요?"}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == (
        "Below is an instruction that describes a task.\n아래는 작업을 설명하는 명령어입니다.\n\n"
        "Write a response that appropriately completes the request.\n"
        "명령어에 따른 요청을 적절히 완료하는 응답을 작성하세요.\n\n"
        "### Instruction(명령어):\n김치는 무엇인가요?\n\n### Response(응답): 김치는 음식입니다.</s>\n\n"
        "### Instruction(명령어):\n더요?\n\n### Response(응답):"
    )
    # A system turn takes the preamble's place.
    assert tokenizer.apply_chat_template([SYSTEM, USER], tokenize=False, add_generation_prompt=True) == (
        f"{SYSTEM['content']}\n\n### Instruction(명령어):\n김치는 무엇인가요?\n\n### Response(응답):"
    )


def test_a_misplaced_system_turn_is_refused_by_both(tokenizer):
    tokenizer.chat_template = TEMPLATES["kochatgpt_short"].chat_template()
    messages = [USER, SYSTEM]
    with pytest.raises(ValueError, match="roles must be user or assistant"):
        TEMPLATES["kochatgpt_short"].format_messages(messages, "</s>")
    with pytest.raises(Exception, match="roles must be user or assistant"):
        tokenizer.apply_chat_template(messages, tokenize=False)


def test_the_template_travels_with_save_pretrained(tokenizer, tmp_path):
    install_template(tokenizer, "koalpaca")
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert saved_template_name(reloaded) == "koalpaca"
    assert prompt_text(reloaded, "김치는?") == "### 질문: 김치는?\n\n### 답변:"
    # Tokenized as TRL tokenizes conversational prompts: the rendered text, no extra special tokens.
    assert (
        prompt_ids(reloaded, "김치는?")
        == reloaded("### 질문: 김치는?\n\n### 답변:", add_special_tokens=False)["input_ids"]
    )


def test_install_keeps_replaces_or_defaults_and_says_so(tokenizer):
    assert saved_template_name(tokenizer) == "kochatgpt_short"  # init-tiny saved it
    assert install_template(tokenizer, None) == ("kochatgpt_short", None)  # kept
    assert install_template(tokenizer, CHAT) == ("kochatgpt_short", None)  # the model's own: kept
    name, note = install_template(tokenizer, "kullm", where="runs/x")
    assert name == "kullm" and note == "template kullm replaces the chat template saved in runs/x (kochatgpt_short)"
    assert saved_template_name(tokenizer) == "kullm"
    tokenizer.chat_template = "{{ messages[0]['content'] }}"  # a model's own template
    assert install_template(tokenizer, None) == (CHAT, None)
    assert install_template(tokenizer, CHAT) == (CHAT, None)
    tokenizer.chat_template = None
    name, note = install_template(tokenizer, None, where="skt/kogpt2-base-v2")
    assert name == "kochatgpt" and "carries no chat template; formatting prompts with kochatgpt" in note
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="template 'chat' needs a tokenizer with a chat template"):
        install_template(tokenizer, CHAT)
    with pytest.raises(ConfigError, match="unknown prompt template 'alpaca'"):
        install_template(tokenizer, "alpaca")


def test_a_tokenizer_that_adds_bos_gets_it_from_the_template(tokenizer):
    """Rendered text is tokenized without special tokens, so a Llama-style tokenizer's bos must be written by the
    template: the token ids then equal what tokenizing the plain text with the tokenizer's own bos gives."""
    from tokenizers import processors

    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = None
    install_template(tokenizer, "kochatgpt_short")
    assert tokenizer.chat_template == TEMPLATES["kochatgpt_short"].chat_template(with_bos=True)
    assert saved_template_name(tokenizer) == "kochatgpt_short"
    text = "### Instruction(명령어):\n김치는?\n\n### Response(응답):"
    assert prompt_ids(tokenizer, "김치는?") == tokenizer(text)["input_ids"]
    assert prompt_ids(tokenizer, "김치는?")[0] == tokenizer.bos_token_id
