"""`kochat-trl pipeline`: SFT → RM → PPO → merge → decoding comparison → conversations → report, in one command."""

from __future__ import annotations

import argparse

# Shown one by one in the summary's time row; the short steps after them (merge, decoding, ...) are summed.
TIMED_STAGES = ("sft", "rm", "ppo", "methods")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "pipeline",
        help="run SFT -> RM -> PPO -> merge -> decoding comparison -> held-out conversations and write a report",
        description="With no arguments: the whole loop on the embedded tiny default, offline, on a CPU. "
        "Stages already finished in the output folder are skipped and an unfinished one resumes from its "
        "newest checkpoint, so a crashed run continues. Each stage shows one progress bar and one result line; "
        "per-step metrics go to the stage's train.log.",
    )
    parser.add_argument("--config", help="pipeline YAML: a path or a bundled config name (default: tiny/pipeline.yaml)")
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir", help="run folder (default: from config)")
    parser.add_argument("--overwrite", action="store_true", help="delete the run folder and start over")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="keep the libraries' console output (per-step dicts, warnings, loading bars)",
    )
    parser.set_defaults(handler=run)


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _times(wall_time: dict[str, float]) -> str:
    """The training stages one by one and the short steps after them summed: one line at the table's width
    (report.md has every step)."""
    trained = [f"{stage} {seconds:.0f}s" for stage, seconds in wall_time.items() if stage in TIMED_STAGES]
    rest = [stage for stage in wall_time if stage not in TIMED_STAGES]
    if rest:
        trained.append(f"{'+'.join(rest)} {sum(wall_time[stage] for stage in rest):.0f}s")
    return ", ".join(trained)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kochat_trl.eval.judge import verdict
    from kochat_trl.eval.overoptimization import hacking_summary
    from kochat_trl.pipeline import run_pipeline

    report = run_pipeline(args.config, args.output_dir, args.overwrite, verbose=args.verbose)
    sft, rm, ppo = report["sft"], report["rm"], report["ppo"]
    before, after = report["judge"]["sft"], report["judge"]["ppo"]
    table = Table(title=f"kochat-trl pipeline: {report['output_dir']}")
    table.add_column("stage")
    table.add_column("result")
    table.add_row("SFT", f"eval loss {sft['eval_loss_start']:.3f} -> {sft['eval_loss_end']:.3f}")
    table.add_row("RM", f"held-out accuracy {rm['accuracy']:.3f}, margin {rm['mean_margin']:.2f}")
    table.add_row(
        "PPO",
        f"reward {ppo['reward_before']:.3f} -> {ppo['reward_after']:.3f} (±{ppo['reward_gain_se'] or 0:.2f}), "
        f"KL {ppo['kl']:.2f}, "
        f"win-rate {ppo['win_rate']:.2f}",
    )
    table.add_row(
        "judge",
        ", ".join(
            f"{label} {_rate(before[key])} -> {_rate(after[key])}"
            for key, label in (
                ("good_rate", "good"),
                ("polite_rate", "polite"),
                ("on_topic_rate", "on-topic"),
                ("faithful_rate", "faithful"),
                ("broken_rate", "broken"),
            )
        )
        + " (topics SFT saw)",
    )
    if before.get("unseen") and after.get("unseen"):
        table.add_row(
            "unseen",
            f"on-topic {_rate(before['unseen']['on_topic_rate'])} -> {_rate(after['unseen']['on_topic_rate'])} "
            f"({after['unseen']['answers']} answers to topics SFT never saw)",
        )
    table.add_row("time", _times(report["wall_time_s"]))
    Console().print(table)
    if line := hacking_summary("ppo", ppo.get("reward_hacking")):
        print(line)
    # Plain lines: a terminal of any width wraps them, a log file keeps them whole.
    for sample in ppo["samples"]:
        seen = "" if sample.get("seen", True) else "  [a topic SFT never saw]"
        print(f"{sample['prompt']}{seen}")
        for name, text, score, judged in (
            ("SFT", sample["before"], sample["score_before"], sample.get("judge_before")),
            ("PPO", sample["after"], sample["score_after"], sample.get("judge_after")),
        ):
            print(f"  {name} ({score:.2f}, {verdict(judged) if judged else 'n/a'}): {text}")
    print(f"report: {report['output_dir']}/report.md, report.json, decoding.md")
    return 0
