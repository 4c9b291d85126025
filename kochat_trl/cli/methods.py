"""`kochat-trl compare-methods`: PPO, RLOO, GRPO, DPO, KTO and ORPO from one SFT model, judged the same way."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare-methods",
        help="train the alignment methods a run folder lacks and compare them all on the same held-out answers",
        description="From RUN's SFT model and reward model: trains each requested method RUN does not hold yet (into "
        "RUN/<method>, with the configs of --configs), then writes methods.json, methods.md and methods.png "
        "(reward against KL) with one row per method: RM reward before/after, KL to the SFT policy, win-rate, the "
        "rule-based judge's rates, wall time, peak memory and trainable parameters.",
    )
    parser.add_argument("--run", required=True, metavar="DIR", help="a pipeline run folder (sft/, rm/, maybe ppo/)")
    parser.add_argument(
        "--methods",
        default="ppo,rloo,grpo,dpo,kto,orpo",
        help="comma-separated, from ppo, rloo, grpo, dpo, kto, orpo (default all)",
    )
    parser.add_argument("--output", metavar="DIR", help="where the comparison goes (default RUN/methods)")
    parser.add_argument("--configs", metavar="DIR", help="the methods' recipe configs (default: the bundled tiny/)")
    parser.add_argument("--verbose", action="store_true", help="keep the libraries' console output")
    parser.set_defaults(handler=run)


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kochat_trl.eval.methods import compare_methods, parse_methods

    rows = compare_methods(args.run, parse_methods(args.methods), args.output, args.configs, args.verbose)
    table = Table(title=f"alignment methods: {args.run}")
    for column in ("method", "good", "polite", "on-topic", "faithful", "RM reward", "KL", "time"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        judge = row["judge"]
        table.add_row(
            row["method"],
            f"{_rate(row.get('good_before'))} -> {_rate(judge.get('good_rate'))}",
            _rate(judge.get("polite_rate")),
            _rate(judge.get("on_topic_rate")),
            _rate(judge.get("faithful_rate")),
            f"{row['reward_before']:.3f} -> {row['reward_after']:.3f}"
            + ("" if row.get("reward_gain_se") is None else f" ±{row['reward_gain_se']:.2f}"),
            f"{row['kl']:.2f}",
            "n/a" if row["wall_time_s"] is None else f"{row['wall_time_s']:.0f}s",
        )
    Console().print(table)
    print(f"comparison: {args.output or args.run + '/methods'}/methods.md, methods.json, methods.png")
    return 0
