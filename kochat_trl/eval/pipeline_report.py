"""The pipeline's report: report.json (the numbers other tools read) and report.md (what a person reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kochat_trl.eval.conversations import RESULT_FILE as CONVERSATIONS_FILE
from kochat_trl.run.outputs import METRICS_FILE, read_json


def build_report(run_dir: Path, wall_time: dict[str, float]) -> dict[str, Any]:
    """report.json: the numbers other tools read (keys nested: report["sft"]["eval_loss_start"])."""
    sft, rm, ppo = (read_json(run_dir / stage / METRICS_FILE) for stage in ("sft", "rm", "ppo"))
    return {
        "sft": {"eval_loss_start": sft["eval_loss_start"], "eval_loss_end": sft["eval_loss_end"]},
        "rm": {"accuracy": rm["accuracy"], "mean_margin": rm["mean_margin"]},
        "ppo": {
            "reward_before": ppo["reward_before"],
            "reward_after": ppo["reward_after"],
            "reward_gain_se": ppo.get("reward_gain_se"),  # absent from runs before 0.1
            "kl": ppo["kl"],
            "win_rate": ppo["win_rate"],
            "samples": ppo["samples"],
            "judge_flips": ppo.get("judge_flips"),
            "curve": ppo.get("curve"),
            "reward_hacking": ppo.get("reward_hacking"),
        },
        # The rule-based judge on the answers PPO's held-out reward is measured on (SFT policy, then PPO policy).
        "judge": {"sft": _judge_rates(ppo["judge_before"]), "ppo": _judge_rates(ppo["judge_after"])},
        # The held-out multi-turn conversations, answered turn by turn (SFT policy, then PPO policy).
        "conversations": _conversation_rates(read_json(run_dir / CONVERSATIONS_FILE)),
        "methods": read_json(run_dir / "methods" / "methods.json"),
        "wall_time_s": wall_time,
        "output_dir": str(run_dir),
    }


def _judge_rates(judged: dict[str, Any]) -> dict[str, Any]:
    """The headline rates (topics SFT saw) and, apart, the same rates on the topics held out of SFT."""
    from kochat_trl.eval.judge import JUDGE_KEYS

    unseen = judged.get("unseen")
    return {
        **{key: judged.get(key) for key in JUDGE_KEYS},
        "answers": judged.get("answers"),
        "unseen": None if unseen is None else {key: unseen[key] for key in (*JUDGE_KEYS, "answers")},
    }


def _conversation_rates(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {name.lower(): model["rates"] for name, model in result["models"].items()}


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _judge_rows(judge: dict[str, Any], ppo: dict[str, Any]) -> list[str]:
    from kochat_trl.eval.judge import JUDGE_KEYS

    rows = []
    for name, reward, rates in (
        ("SFT", ppo["reward_before"], judge["sft"]),
        ("PPO", ppo["reward_after"], judge["ppo"]),
    ):
        unseen = rates.get("unseen") or {}
        rows.append(
            f"| {name} | {reward:.3f} | "
            + " | ".join(_rate(rates.get(key)) for key in JUDGE_KEYS)
            + f" | {_rate(unseen.get('on_topic_rate'))} |"
        )
    return rows


def _sample_lines(samples: list[dict[str, Any]]) -> list[str]:
    from kochat_trl.eval.judge import verdict

    lines = []
    for sample in samples:
        label = "" if sample.get("seen", True) else " (a topic SFT never saw: no model here can know it)"
        lines += [f"**{sample['prompt']}**{label}", ""]
        for name, text, score, judged in (
            ("SFT", sample["before"], sample["score_before"], sample.get("judge_before") or {}),
            ("PPO", sample["after"], sample["score_after"], sample.get("judge_after") or {}),
        ):
            lines.append(f"- {name} (RM {score:.2f}; judge: {verdict(judged) if judged else 'n/a'}): {text}")
        lines.append("")
    return lines


def render_report(report: dict[str, Any]) -> str:
    from kochat_trl.eval.overoptimization import hacking_summary

    sft, rm, ppo, judge = report["sft"], report["rm"], report["ppo"], report["judge"]
    flips = ppo.get("judge_flips") or {}
    good_before, good_after = judge["sft"].get("good_rate"), judge["ppo"].get("good_rate")
    lines = [
        "# kochat-trl pipeline report",
        "",
        f"**Good answers (the rule-based judge, held-out prompts of topics SFT saw): SFT {_rate(good_before)} → "
        f"PPO {_rate(good_after)}.** Polite (합니다체) {_rate(judge['sft'].get('polite_rate'))} → "
        f"{_rate(judge['ppo'].get('polite_rate'))}.",
        *(
            [
                "",
                f"Of {flips['answers']} paired answers (same prompt, same seed), PPO changed {flips['changed']}: "
                f"{flips['became_good']} became good, {flips['stopped_being_good']} stopped being good"
                + (
                    f" (good rate {flips['good_gain']:+.3f} ± {flips['good_gain_se']:.3f}, paired standard error)."
                    if "good_gain_se" in flips
                    else "."
                ),
            ]
            if flips
            else []
        ),
        *(["", f"**{line}.**"] if (line := hacking_summary("PPO", ppo.get("reward_hacking"))) else []),
        "",
        "## What PPO changed: held-out answers, SFT → PPO",
        "",
        *_sample_lines(ppo["samples"]),
        "## Held-out answers: reward model (proxy) and rule-based judge (gold)",
        "",
        "The same held-out answers, scored by the reward model and by `kochat_trl.eval.judge`: good = polite "
        "(합니다체) and on topic and faithful (every sentence is one the topic table says about the asked topic) "
        "with no broken character and no repeated word bigram. The rates count the topics SFT saw; the topics held "
        "out of SFT can never be answered faithfully and have their own column. RM reward up with the judge's rates "
        "down would be reward hacking.",
        "",
        "| policy | RM reward | good | polite (합니다체) | on topic | faithful | broken | Hangul share | repeats "
        "| on topic, unseen topics |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *_judge_rows(judge, ppo),
        "",
        "| stage | metric | value |",
        "|---|---|---:|",
        f"| SFT | eval loss (start → end) | {sft['eval_loss_start']:.3f} → {sft['eval_loss_end']:.3f} |",
        f"| RM | held-out pairwise accuracy | {rm['accuracy']:.3f} |",
        f"| RM | mean margin | {rm['mean_margin']:.3f} |",
        f"| PPO | RM reward (SFT → PPO) | {ppo['reward_before']:.3f} → {ppo['reward_after']:.3f} |",
        f"| PPO | standard error of the reward gain (paired answers) | {_rate(ppo['reward_gain_se'])} |",
        f"| PPO | KL to the SFT policy | {ppo['kl']:.3f} |",
        f"| PPO | win-rate over SFT (judged by the RM) | {ppo['win_rate']:.3f} |",
        "",
    ]
    conversations = read_json(Path(report["output_dir"]) / CONVERSATIONS_FILE)
    if conversations:
        from kochat_trl.eval.conversations import conversation_lines

        lines += [
            "## Conversations: held-out questions of 2 and 3 turns",
            "",
            f"{len(conversations['questions'])} held-out conversations about topics SFT saw, every question in a form "
            "SFT never saw. Each model answers turn by turn, greedy, its own answers becoming the history; the judge "
            "rates each answer against its own question (on topic: it names the asked topic, not an earlier one).",
            "",
            *conversation_lines(conversations),
            "",
        ]
    if ppo.get("curve"):
        lines += [
            "## Gold against proxy over PPO",
            "",
            "| step | KL | RM reward (proxy) | good (gold) | polite | on topic | faithful |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {point['step']} | {point['kl']:.3f} | {point['reward']:.3f} | {_rate(point['good_rate'])} | "
                f"{_rate(point['polite_rate'])} | {_rate(point['on_topic_rate'])} | {_rate(point['faithful_rate'])} |"
                for point in ppo["curve"]
            ),
            "",
            "![gold against proxy](ppo/overoptimization.png)",
            "",
        ]
    lines += [
        "## Wall time (s)",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *(f"| {stage} | {seconds:.1f} |" for stage, seconds in report["wall_time_s"].items()),
        "",
    ]
    if report.get("methods"):
        table = (Path(report["output_dir"]) / "methods" / "methods.md").read_text(encoding="utf-8")
        lines += [
            "## Alignment methods (same SFT model, same held-out answers)",
            "",
            *[line for line in table.splitlines() if line.startswith("|")],
            "",
            "Details and the reward-KL plot: [methods/methods.md](methods/methods.md).",
            "",
        ]
    lines += [
        "## Curves",
        "",
        "![SFT](sft/curves.png)",
        "![RM](rm/curves.png)",
        "![PPO](ppo/curves.png)",
        "",
        "Decoding strategies compared: [decoding.md](decoding.md).",
        "",
    ]
    return "\n".join(lines)
