"""The held-out comparison's numbers on hand-made scores: the mean gain's paired standard error and the win-rate."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from kochat_trl.eval.comparison import paired_standard_error, policy_comparison


def test_paired_standard_error_is_the_sample_deviation_of_the_gains_over_root_n():
    # gains 1, 2, 3, 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, sample variance 5/3, / 4 answers
    assert paired_standard_error([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 12))
    assert paired_standard_error([0.5, 0.5, 0.5]) == 0.0  # every answer gained the same: no uncertainty
    assert paired_standard_error([0.7]) == 0.0  # one answer: no deviation to estimate


class _Tokenizer(SimpleNamespace):
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return "김치는 한국의 발효 음식입니다." if ids else ""


def test_policy_comparison_pairs_each_answer_with_its_own_before():
    answers = [[5, 2], [6, 2], [7, 2], [8]]
    metrics = policy_comparison(
        _Tokenizer(),
        ["김치를 소개해 주세요.", "김치가 궁금합니다."],
        answers,
        [1.0, 2.0, 3.0, 0.0],
        answers,
        [3.0, 2.0, 2.0, 4.0],  # gains +2, 0, -1, +4: mean 1.25, deviations 0.75, -1.25, -2.25, 2.75
        kl=0.5,
        kl_bound=12.0,
        samples_per_prompt=2,
    )
    assert metrics["reward_before"] == 1.5 and metrics["reward_after"] == 2.75
    assert metrics["reward_gain_se"] == pytest.approx(math.sqrt((0.5625 + 1.5625 + 5.0625 + 7.5625) / 3 / 4))
    assert metrics["win_rate"] == (1.0 + 0.5 + 0.0 + 1.0) / 4
    assert metrics["eos_rate_after"] == 0.75 and metrics["judge_after"]["answers"] == 4


def test_methods_table_shows_each_gain_with_its_standard_error():
    from kochat_trl.eval.judge import JUDGE_KEYS
    from kochat_trl.eval.methods import render_markdown

    row = {
        "method": "dpo",
        "reward_before": 2.47,
        "reward_after": 2.455,
        "reward_gain_se": 0.0501,
        "kl": 0.157,
        "win_rate": 0.498,
        "judge": {**dict.fromkeys(JUDGE_KEYS, 1.0), "good_rate": 0.5},
        "good_before": 0.4,
        "implicit_accuracy": 0.869,
        "wall_time_s": 53.1,
        "peak_rss_mb": 784.0,
        "trainable_params": 294912,
    }
    older = {**row, "method": "ppo", "reward_gain_se": None}  # a run folder from before reward_gain_se
    markdown = render_markdown([row, older])
    assert "| dpo | 0.400 → 0.500 | 1.000 | 1.000 | 1.000 | 2.470 → 2.455 ± 0.050 | 0.157 |" in markdown
    assert "| ppo | 0.400 → 0.500 | 1.000 | 1.000 | 1.000 | 2.470 → 2.455 | 0.157 |" in markdown
    # A method that adds less than +0.25 to the good rate is named, with by how much.
    assert "- **dpo** raised the good rate by +0.100, short of +0.25" in markdown


def test_a_rate_gain_s_standard_error_is_the_paired_one():
    """+1 for each answer that became good, -1 for each that stopped, 0 for the rest: the closed form equals
    paired_standard_error of those per-answer gains."""
    from kochat_trl.eval.comparison import paired_rate_gain_se, paired_standard_error

    gains = [1.0] * 30 + [-1.0] * 7 + [0.0] * 63
    assert paired_rate_gain_se(30, 7, 100) == pytest.approx(paired_standard_error(gains))
    assert paired_rate_gain_se(0, 0, 1) == 0.0


def _point(step, kl, reward, good):
    return {"step": step, "kl": kl, "reward": reward, "good_rate": good, "polite_rate": good, "on_topic_rate": 1.0}


def test_reward_hacking_is_named_where_gold_falls_while_proxy_rises(tmp_path):
    from kochat_trl.eval.overoptimization import (
        curve_steps,
        hacking_summary,
        plot_overoptimization,
        reward_hacking_step,
    )

    assert curve_steps(60, 6) == [0, 12, 24, 36, 48, 60] and curve_steps(3, 6) == [0, 1, 2, 3]
    rising = [_point(step, step / 20, 2 + step / 30, 0.45 + step / 200) for step in (0, 12, 24, 36, 48, 60)]
    assert reward_hacking_step(rising) is None
    # Gold peaks at step 24 (0.70) and ends at 0.55 while the proxy keeps climbing: hacking after step 24.
    hacked = [_point(0, 0, 2.0, 0.45), _point(12, 0.5, 2.5, 0.6), _point(24, 1, 3.0, 0.7), _point(36, 3, 3.5, 0.62)]
    hacked.append(_point(48, 6, 4.0, 0.55))
    found = reward_hacking_step(hacked)
    assert found == {"step": 24, "good_rate_peak": 0.7, "good_rate_end": 0.55, "reward_peak": 3.0, "reward_end": 4.0}
    assert hacking_summary("ppo", found).startswith("ppo: reward hacking after step 24: the judge's good rate fell")
    # A gold drop within noise (0.05), or a proxy that fell too, is not called hacking.
    assert reward_hacking_step([*hacked[:3], _point(36, 3, 3.5, 0.65)]) is None
    assert reward_hacking_step([*hacked[:3], _point(36, 3, 2.9, 0.5)]) is None
    assert plot_overoptimization(hacked, tmp_path / "o.png").stat().st_size > 10_000
