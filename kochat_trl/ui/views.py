"""What the page shows, as Markdown and HTML text built from a run folder and from answers (no gradio here)."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

from kochat_trl.eval.generation import decoding_kwargs
from kochat_trl.eval.judge import JUDGE_KEYS
from kochat_trl.ui.run_folder import RunFolder, StageData

JUDGE_COLUMNS = ("good", "polite (합니다체)", "on topic", "faithful", "broken", "Hangul share", "repeats")
FLAG_LABELS = {
    "good": "good",
    "polite": "합니다체",
    "on_topic": "on topic",
    "faithful": "faithful",
    "broken": "broken character",
    "repeats": "repeats",
}


def _number(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *["---:"] * (len(header) - 1)]) + "|"]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def problems_markdown(run: RunFolder) -> str:
    """A clear note on a half-finished run ('' when it is complete)."""
    if run.finished:
        return ""
    lines = [f"**This run is not finished** (`{run.path}`): the page shows what is there.", ""]
    lines += [f"- {problem}" for problem in run.problems]
    lines += [
        "",
        f"Finish it with `kochat-trl pipeline --output_dir {run.path}` (finished stages are kept), then "
        "press **Reload the run folder**.",
    ]
    return "\n".join(lines)


def report_markdown(run: RunFolder) -> str:
    """The Run tab's main column: the models, what a half-finished run lacks, report.json's numbers, the judge table."""
    lines = [f"Models: **{', '.join(run.model_names()) or 'none yet'}**.", ""]
    if problems := problems_markdown(run):
        lines += [problems, ""]
    report = run.report
    if report is None:
        return "\n".join(lines) + "\n"
    sft, rm, ppo, judge = report["sft"], report["rm"], report["ppo"], report["judge"]
    before, after = judge["sft"], judge["ppo"]
    lines += [
        "**Good answers (rule-based judge, held-out prompts of topics SFT saw): "
        f"SFT {_number(before.get('good_rate'))} → PPO {_number(after.get('good_rate'))}**; polite (합니다체) "
        f"{_number(before.get('polite_rate'))} → {_number(after.get('polite_rate'))}. "
        "The Compare tab's first prompts are ones PPO changed.",
        "",
    ]
    lines += ["### Numbers (report.json)", ""]
    lines += _table(
        ["stage", "metric", "value"],
        [
            ["SFT", "eval loss (start → end)", f"{_number(sft['eval_loss_start'])} → {_number(sft['eval_loss_end'])}"],
            ["RM", "held-out pairwise accuracy", _number(rm["accuracy"])],
            ["RM", "mean margin", _number(rm["mean_margin"])],
            ["PPO", "RM reward (SFT → PPO)", f"{_number(ppo['reward_before'])} → {_number(ppo['reward_after'])}"],
            ["PPO", "KL to the SFT policy", _number(ppo["kl"])],
            ["PPO", "win-rate over SFT (judged by the RM)", _number(ppo["win_rate"])],
        ],
    )
    lines += ["", "### Held-out answers: reward model and rule-based judge", ""]
    rows = [
        [name, _number(reward), *(_number(judge[key].get(rate)) for rate in JUDGE_KEYS)]
        for name, reward, key in (("SFT", ppo["reward_before"], "sft"), ("PPO", ppo["reward_after"], "ppo"))
    ]
    for method in report.get("methods") or []:
        if method["method"] != "ppo":
            rows.append(
                [
                    method["method"].upper(),
                    _number(method["reward_after"]),
                    *(_number(method["judge"].get(rate)) for rate in JUDGE_KEYS),
                ]
            )
    lines += _table(["policy", "RM reward", *JUDGE_COLUMNS], rows)
    lines += [
        "",
        "Good = polite, on topic, faithful (every sentence one the topic table says about the asked topic), no broken "
        "character, no repeat; the rates count the topics SFT saw. RM reward up while the judge's rates fall would be "
        "reward hacking.",
    ]
    return "\n".join(lines) + "\n"


def wall_time_markdown(run: RunFolder) -> str:
    """Seconds each step of the pipeline took."""
    wall = run.wall_times()
    if not wall:
        return "No wall times recorded yet."
    rows = [[name, f"{seconds:.1f}"] for name, seconds in wall.items()]
    return "\n".join(["### Wall time", "", *_table(["step", "seconds"], rows)]) + "\n"


def report_text(run: RunFolder) -> str:
    """report.md without its image lines (the curves are shown as pictures beside it)."""
    path = run.path / "report.md"
    if not path.is_file():
        return "report.md is not written yet."
    return "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("!["))


def curves_html(run: RunFolder) -> str:
    """Every stage's curves.png (served by the app from the run folder, see `allowed_paths`), two per row."""
    figures = [
        f'<figure class="kochat-curve"><img src="gradio_api/file={html.escape(str(path), quote=True)}" '
        f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        for path, caption in run.curves()
    ]
    return f'<div class="kochat-curves">{"".join(figures)}</div>' if figures else "<p>No curves.png yet.</p>"


def options_markdown(strategy: str, overrides: dict[str, Any] | None = None, max_new_tokens: int = 64) -> str:
    """The `generate()` keyword arguments a strategy and the options give."""
    return f"`generate(**{json.dumps(decoding_kwargs(strategy, overrides, max_new_tokens), ensure_ascii=False)})`"


def _flag_badges(judge: dict[str, Any]) -> str:
    badges = []
    for key, label in FLAG_LABELS.items():
        value = judge.get(key)
        if value is None:
            continue
        good = not value if key in ("broken", "repeats") else bool(value)
        text = label if value else f"no {label}" if key in ("broken", "repeats") else f"not {label}"
        badges.append(f'<span class="kochat-flag {"good" if good else "bad"}">{html.escape(text)}</span>')
    badges.append(f'<span class="kochat-flag">Hangul {judge.get("hangul_share", 0.0):.2f}</span>')
    return " ".join(badges)


def answers_html(results: Sequence[dict[str, Any]]) -> str:
    """The answers side by side: one card per model with its answer, reward-model score and judge flags."""
    cards = []
    for item in results:
        reward = "no reward model" if item["reward"] is None else f"RM score {item['reward']:.3f}"
        cards.append(
            f'<div class="kochat-answer" data-model="{html.escape(item["model"])}">'
            f'<div class="kochat-model">{html.escape(item["model"])}</div>'
            f'<div class="kochat-text">{html.escape(item["answer"]) or "<i>(empty answer)</i>"}</div>'
            f'<div class="kochat-reward">{html.escape(reward)}</div>'
            f'<div class="kochat-flags">{_flag_badges(item["judge"])}</div></div>'
        )
    return f'<div class="kochat-answers">{"".join(cards)}</div>'


def message_html(text: str) -> str:
    """A message where the answers would be (an empty prompt, bad options)."""
    return f'<div class="kochat-message">{html.escape(text)}</div>'


def _md_cell(text: str) -> str:
    return html.escape(text).replace("|", "\\|").replace("\n", "<br>") or " "


def dataset_markdown(data: StageData) -> str:
    """One stage: its data source, the read/kept/dropped counts (every drop reason) and its first rows as a table."""
    if data.error:
        return f"### {data.stage}\n\n`{data.source}` cannot be read: {data.error}\n"
    headers = list(dict.fromkeys(key for row in data.rows for key in row))
    lines = [
        f"### {data.stage}: `{data.source}`",
        "",
        f"{data.summary}.",
        "",
        f"First {len(data.rows)} rows:",
        "",
        "| # | " + " | ".join(headers) + " |",
        "|---:|" + "---|" * len(headers),
    ]
    lines += [
        f"| {index} | " + " | ".join(_md_cell(row.get(key, "")) for key in headers) + " |"
        for index, row in enumerate(data.rows, 1)
    ]
    return "\n".join(lines) + "\n"


def datasets_markdown(datasets: Sequence[StageData]) -> str:
    """The Data tab: every stage's data, or why there is none."""
    if not datasets:
        return "No stage of this run has a config.yaml naming its data yet."
    return "\n".join(dataset_markdown(data) for data in datasets)


CSS = """
.kochat-answers {display: flex; gap: 12px; flex-wrap: wrap; align-items: stretch;}
.kochat-answer {flex: 1 1 220px; border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 10px;
                background: var(--background-fill-secondary);}
.kochat-model {font-weight: 700; font-size: 1.05em; margin-bottom: 6px;}
.kochat-text {white-space: pre-wrap; margin-bottom: 8px; min-height: 3em;}
.kochat-reward {font-family: var(--font-mono); margin-bottom: 6px;}
.kochat-flag {display: inline-block; border-radius: 4px; padding: 0 5px; margin: 1px; font-size: 0.85em;
              background: var(--background-fill-primary); border: 1px solid var(--border-color-primary);}
.kochat-flag.good {color: #15803d;} .kochat-flag.bad {color: #b91c1c; font-weight: 600;}
.kochat-curves {display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 10px;}
.kochat-curve {margin: 0;} .kochat-curve img {width: 100%; border: 1px solid var(--border-color-primary);}
.kochat-curve figcaption {text-align: center; font-size: 0.9em;}
.kochat-tables th, .kochat-tables td {white-space: nowrap; padding: 3px 10px !important;}
.kochat-compact th, .kochat-compact td {padding: 3px 8px !important;}
.kochat-message {padding: 10px; border-radius: 8px; border: 1px solid #f59e0b; background: #fffbeb; color: #92400e;}
"""
