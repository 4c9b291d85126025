"""`kochat-trl ui`: a local web page to look at a run (report and curves, answers side by side, chat, data).

`models` holds the logic (model cache, compare, chat) as plain functions, `views` turns a run and answers into
Markdown/HTML, and `app` builds the Gradio page from both; only `app` imports gradio.
"""
