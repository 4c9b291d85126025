"""The Gradio page of `kochat-trl ui`: Run, Compare, Chat and Data tabs over one run folder.

Offline by design: no share link unless asked, no analytics (`kochat_trl.cli.ui` sets GRADIO_ANALYTICS_ENABLED=False
before gradio is imported, and the Blocks say so too), the default theme's fonts are served by the app itself.
Every generation event (the page's Compare and Chat, the `/compare` API) shares one queue slot
(`concurrency_id="generation"`, limit 1), and `ModelCache.generation_lock` serialises direct calls too. The queue
holds at most `queue_size` waiting requests (gradio refuses the rest with "Queue is full"); what one request may ask
is bounded by `kochat_trl.ui.limits`.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from kochat_trl.errors import KochatError
from kochat_trl.eval.generation import DECODING_PRESETS, DEFAULT_MAX_NEW_TOKENS
from kochat_trl.run.console import say
from kochat_trl.ui import views
from kochat_trl.ui.limits import DEFAULT_QUEUE_SIZE, MAX_DATA_ROWS, MAX_NEW_TOKENS, check_rows
from kochat_trl.ui.models import DEFAULT_SEED, ModelCache, chat_reply, compare, parse_options, template_info
from kochat_trl.ui.run_folder import RunFolder, held_out_prompts, open_run, stage_datasets

GENERATION = {"concurrency_limit": 1, "concurrency_id": "generation"}
DATA_ROWS = 5
TABLES = "kochat-tables"  # compact Markdown tables (views.CSS)


def _message(error: BaseException) -> str:
    """A user error as it is; anything else as one line (the traceback goes to the server's stderr)."""
    if isinstance(error, KochatError):
        return str(error)
    traceback.print_exception(error, file=sys.stderr)
    return f"{type(error).__name__}: {error}".replace("\n", " ")


class RunPage:
    """The run being shown and its model cache; Reload replaces both (a stage may have finished meanwhile)."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run
        self.cache = ModelCache(run)

    def reload(self) -> None:
        self.run = open_run(self.run.path)
        self.cache = ModelCache(self.run)


def _guarded(function: Callable[..., Any], on_error: Callable[[str], Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        try:
            return function(*args)
        except Exception as error:  # the page shows a message, never a traceback
            return on_error(_message(error))

    return run


def _run_tab(page: RunPage) -> gr.Button:
    with gr.Row():
        with gr.Column(scale=3):
            overview = gr.Markdown(views.report_markdown(page.run), elem_id="kochat-report", elem_classes=TABLES)
        with gr.Column(scale=1, min_width=200):
            reload = gr.Button("Reload the run folder", size="sm")
            wall = gr.Markdown(views.wall_time_markdown(page.run), elem_id="kochat-wall-time", elem_classes=TABLES)
    curves = gr.HTML(views.curves_html(page.run), label="Training curves", elem_id="kochat-curves")
    with gr.Accordion("report.md", open=False):
        report = gr.Markdown(views.report_text(page.run))

    def refresh() -> tuple[str, str, str, str]:
        page.reload()
        run = page.run
        return views.report_markdown(run), views.wall_time_markdown(run), views.curves_html(run), views.report_text(run)

    reload.click(
        _guarded(refresh, lambda text: (views.message_html(text), "", "", "")),
        None,
        [overview, wall, curves, report],
        api_visibility="private",
    )
    return reload


def _decoding_controls() -> tuple[gr.Dropdown, gr.Number, gr.Number, gr.Textbox, gr.Markdown]:
    with gr.Row():
        strategy = gr.Dropdown(list(DECODING_PRESETS), value="greedy", label="Decoding strategy", scale=1)
        max_new_tokens = gr.Number(
            DEFAULT_MAX_NEW_TOKENS, precision=0, minimum=1, maximum=MAX_NEW_TOKENS, label="max new tokens", scale=1
        )
        seed = gr.Number(DEFAULT_SEED, precision=0, label="seed", scale=1)
        options = gr.Textbox(
            label="generate options (KEY=VALUE, one per line, like --gen)",
            lines=1,
            scale=2,
            placeholder="repetition_penalty=1.2",
        )
    kwargs = gr.Markdown(views.options_markdown("greedy"))

    def show(strategy: str, options: str, max_new_tokens: float | None) -> str:
        return views.options_markdown(strategy, parse_options(options), int(max_new_tokens or DEFAULT_MAX_NEW_TOKENS))

    for control in (strategy, options, max_new_tokens):
        control.change(
            _guarded(show, lambda text: f"**{text}**"),
            [strategy, options, max_new_tokens],
            kwargs,
            api_visibility="private",
            queue=False,
        )
    return strategy, max_new_tokens, seed, options, kwargs


def _compare_tab(page: RunPage, prompts: list[str]) -> None:
    gr.Markdown(
        "Every model of the run answers the same prompt, with its reward-model score (the run's `rm/`) and "
        "the rule-based judge's flags. Prompts are formatted by each model's own chat template."
    )
    with gr.Row():
        prompt = gr.Textbox(
            value=prompts[0] if prompts else "", label="Prompt", lines=2, scale=3, elem_id="kochat-prompt"
        )
        held_out = gr.Dropdown(prompts, value=None, label=f"Held-out prompts ({len(prompts)})", scale=2)
    held_out.change(
        lambda choice, current: choice or current, [held_out, prompt], prompt, api_visibility="private", queue=False
    )
    strategy, max_new_tokens, seed, options, _ = _decoding_controls()
    button = gr.Button("Answer with every model", variant="primary", elem_id="kochat-compare-button")
    answers = gr.HTML(elem_id="kochat-answers")

    def show(prompt: str, strategy: str, options: str, max_new_tokens: float | None, seed: float | None) -> str:
        results = compare(page.cache, prompt, strategy, parse_options(options), max_new_tokens, seed)
        return views.answers_html(results)

    inputs = [prompt, strategy, options, max_new_tokens, seed]
    button.click(_guarded(show, views.message_html), inputs, answers, api_visibility="private", **GENERATION)
    prompt.submit(_guarded(show, views.message_html), inputs, answers, api_visibility="private", **GENERATION)


def _chat_tab(page: RunPage, tab: gr.Tab) -> gr.Dropdown:
    names = page.run.model_names()
    default = "ppo" if "ppo" in names else (names[-1] if names else None)
    with gr.Row(equal_height=True):
        model = gr.Dropdown(names, value=default, label="Model", elem_id="kochat-chat-model", scale=1)
        template = gr.Markdown("The chat template is shown once the model is loaded.", elem_id="kochat-template")
    strategy, max_new_tokens, seed, options, _ = _decoding_controls()
    chatbot = gr.Chatbot(
        label="Chat", height=320, buttons=["copy", "copy_all"], feedback_options=None, elem_id="kochat-chatbot"
    )
    status = gr.Markdown()
    with gr.Row():
        message = gr.Textbox(label="Message", placeholder="김치에 대해 알려 주세요.", scale=4, elem_id="kochat-message")
        send = gr.Button("Send", variant="primary", scale=1)
        reset = gr.Button("Reset", scale=1)
    with gr.Accordion("What the model was given (the conversation rendered by its chat template)", open=False):
        rendered = gr.Code(label="model input", language=None, interactive=False)
    with gr.Accordion("Chat template (Jinja, saved with the tokenizer)", open=False):
        source = gr.Code(label="chat_template", language="jinja2", interactive=False)
    history = gr.State([])

    def describe(name: str | None) -> tuple[str, str]:
        if not name:
            return "This run has no model to chat with yet.", ""
        template_name, text = template_info(page.cache, name)
        return f"`{name}` formats every turn with its chat template **{template_name}**.", text

    def turn(
        text: str, turns: list, name: str, strategy: str, options: str, max_new_tokens: float | None, seed: float | None
    ) -> tuple:
        if not name:
            raise KochatError("This run has no model to chat with yet.")
        turns, given, note = chat_reply(
            page.cache, name, turns, text, strategy, parse_options(options), max_new_tokens, seed
        )
        return "", turns, turns, given, note or ""

    def failed(text: str) -> tuple:
        return gr.update(), gr.update(), gr.update(), gr.update(), f"**{text}**"

    for event in (model.change, tab.select):  # the template needs the model's tokenizer: loaded on first look
        event(_guarded(describe, lambda text: (f"**{text}**", "")), model, [template, source], api_visibility="private")
    inputs = [message, history, model, strategy, options, max_new_tokens, seed]
    outputs = [message, history, chatbot, rendered, status]
    for event in (send.click, message.submit):
        event(_guarded(turn, failed), inputs, outputs, api_visibility="private", **GENERATION)

    def cleared() -> tuple:
        return "", [], [], "", "(history cleared)"

    reset.click(cleared, None, outputs, api_visibility="private", queue=False)
    chatbot.clear(cleared, None, outputs, api_visibility="private", queue=False)  # the chat box's own bin icon
    return model


def _data_tab(page: RunPage) -> None:
    gr.Markdown(
        "The data each stage trained on, read as its recipe read it (`dataset_name` of its config.yaml), with "
        "the counts of rows read, kept and dropped (empty, duplicate, tied ranking pairs)."
    )
    rows = gr.Slider(1, MAX_DATA_ROWS, value=DATA_ROWS, step=1, label="rows per stage")
    text = gr.Markdown(
        views.datasets_markdown(stage_datasets(page.run, DATA_ROWS)),
        elem_id="kochat-data",
        elem_classes="kochat-compact",
    )
    rows.release(
        _guarded(
            lambda count: views.datasets_markdown(stage_datasets(page.run, check_rows(count))),
            lambda message: f"**{message}**",
        ),
        rows,
        text,
        api_visibility="private",
    )


def build_app(run_dir: str | os.PathLike, queue_size: int = DEFAULT_QUEUE_SIZE) -> tuple[gr.Blocks, RunPage]:
    """The page over `run_dir` (KochatError when it is not a run folder) and the state behind it; at most
    `queue_size` requests wait for their turn."""
    page = RunPage(open_run(run_dir))
    prompts = held_out_prompts(page.run)
    with gr.Blocks(title=f"kochat-trl: {page.run.path.name}", analytics_enabled=False) as demo:
        gr.Markdown(f"## kochat-trl · `{page.run.path}`")
        with gr.Tabs():
            with gr.Tab("Run", id="run"):
                reload = _run_tab(page)
            with gr.Tab("Compare", id="compare"):
                _compare_tab(page, prompts)
            with gr.Tab("Chat", id="chat") as chat:
                chat_model = _chat_tab(page, chat)
            with gr.Tab("Data", id="data"):
                _data_tab(page)

        def compare_api(
            prompt: str,
            strategy: str = "greedy",
            options: str = "",
            max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
            seed: int = DEFAULT_SEED,
        ) -> list[dict]:
            """Every model's greedy (or `strategy`) answer: [{model, answer, reward, judge}]. `options` are generate
            options as the page takes them (KEY=VALUE, one per line)."""
            try:
                return compare(page.cache, prompt, strategy, parse_options(options), max_new_tokens, seed)
            except KochatError as error:
                raise gr.Error(str(error), print_exception=False) from None  # a user error: no traceback

        gr.api(compare_api, api_name="compare", **GENERATION)
        # After a reload the run may hold more models (a stage finished): the chat offers them too.
        reload.click(lambda: gr.update(choices=page.run.model_names()), None, chat_model, api_visibility="private")
    demo.queue(default_concurrency_limit=1, max_size=queue_size)
    return demo, page


def serve(
    run_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    block: bool = True,
    queue_size: int = DEFAULT_QUEUE_SIZE,
) -> gr.Blocks:
    """Build and launch the page; with `block` until Ctrl-C, else it keeps serving until `demo.close()`."""
    demo, page = build_app(run_dir, queue_size)
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            share=share,
            inbrowser=False,
            prevent_thread_lock=True,
            show_error=True,
            quiet=True,
            footer_links=["api", "settings"],
            mcp_server=False,
            ssr_mode=False,
            pwa=False,
            allowed_paths=[str(Path(page.run.path))],
            css=views.CSS,
        )
    except OSError as error:  # gradio's text names its own knobs (server_port, GRADIO_SERVER_PORT): say it plainly
        reason = "the port is in use" if "empty port" in str(error) else str(error).replace("\n", " ")
        raise KochatError(f"cannot serve on {host}:{port} ({reason}); pass a free --port") from None
    public = f"; public link {demo.share_url}" if share and demo.share_url else ""
    say(f"ui: {page.run.path} on {demo.local_url}{public} (Ctrl-C stops)")
    if block:
        demo.block_thread()
    return demo
