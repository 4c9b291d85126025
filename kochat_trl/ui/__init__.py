"""`kochat-trl ui`: a local web page to look at a run (report and curves, answers side by side, chat, data).

`run_folder` reads the run folder, `models` holds the logic (model cache, compare, chat) as plain functions,
`limits` the bounds on what one request may ask, `views` turns a run and answers into Markdown/HTML, and `app`
builds the Gradio page from them; only `app` imports gradio.
"""
