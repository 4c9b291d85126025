"""The rule-based judge (kochat_trl.eval.judge): exact values on hand-made answers, one rule at a time."""

from __future__ import annotations

import json

import pytest

from kochat_trl.data.readers import bundled_data_path
from kochat_trl.eval.judge import JUDGE_KEYS, asked_topic, flags, judge_answer, judge_answers, topic_names, verdict

GOOD = "김치는 배추와 고춧가루로 만드는 한국의 발효 음식입니다."


def test_broken_character():
    assert judge_answer("김치는 무엇인가요?", "김치는 \ufffd 음식입니다.").broken is True
    assert judge_answer("김치는 무엇인가요?", GOOD).broken is False


def test_hangul_share_counts_letters_only():
    assert judge_answer("김치는 무엇인가요?", GOOD).hangul_share == 1.0  # spaces and the full stop are not letters
    assert judge_answer("김치는 무엇인가요?", "I don't know.").hangul_share == 0.0
    assert judge_answer("김치는 무엇인가요?", "GPS는 위치 기술입니다.").hangul_share == pytest.approx(8 / 11)
    assert judge_answer("김치는 무엇인가요?", "1443.").hangul_share == 0.0  # no letters at all


@pytest.mark.parametrize(
    ("answer", "polite"),
    [
        (GOOD, True),
        ("궁금한 점이 있습니까?", True),
        ("김치는 음식입니다", True),
        ("김치? 그냥 배추 반찬이야.", False),
        ("김치는 음식입니다. 몰라.", False),
        ("김치는 음식이야. 오래 익히면 신맛이 강해집니다.", False),  # slips out of 합니다체 halfway
        ("김치는 배추와 고춧가루로 만드는", False),
        ("", False),
    ],
)
def test_polite_means_every_sentence_ends_in_hamnida_style(answer, polite):
    assert judge_answer("김치는 무엇인가요?", answer).polite is polite


def test_on_topic_names_the_asked_topic_as_a_word():
    assert asked_topic("돌고래에 관해 무엇을 알고 있나요?") == "돌고래"  # longest name first, not 고래
    assert asked_topic("고래가 궁금합니다.") == "고래"
    assert asked_topic("오늘 날씨 어때?") is None
    assert judge_answer("고래가 궁금합니다.", "고래는 바다에 사는 포유류입니다.").on_topic is True
    assert judge_answer("고래가 궁금합니다.", "돌고래는 지능이 높은 바다 포유류입니다.").on_topic is False
    assert judge_answer("김치가 궁금합니다.", "서울은 대한민국의 수도입니다.").on_topic is False
    assert judge_answer("오늘 날씨 어때?", "맑습니다.").on_topic is None  # no topic of the table: not judged


def test_repeats_a_word_bigram():
    assert judge_answer("김치는 무엇인가요?", "김치는 맛있습니다. 김치는 맛있습니다.").repeats is True
    assert judge_answer("김치는 무엇인가요?", "김치는 김치는 맛있습니다.").repeats is False  # one word twice: no bigram
    assert judge_answer("김치는 무엇인가요?", GOOD).repeats is False


@pytest.mark.parametrize(
    ("prompt", "answer", "faithful"),
    [
        ("김치는 무엇인가요?", GOOD, True),
        (
            "김치는 무엇인가요?",
            "김치는 배추와 고춧가루로 만드는 한국의 발효 음식이야. 오래 익히면 신맛이 강해져.",
            True,
        ),
        ("김치는 무엇인가요?", "김치는 배추 반찬이야.", True),  # the clipped 반말 sentence: curt, but true
        ("김치는 무엇인가요?", f"{GOOD} 에펠탑과 루브르 박물관이 있습니다.", False),  # another topic's fact
        ("태양광 발전이 궁금합니다.", "태양광 발전은 햇빛을 전기로 에펠탑과을에 많이 있습니다.", False),  # word salad
        ("김치는 무엇인가요?", "김치는 배추와 고춧가루로 만드는", False),  # cut off
        ("김치는 무엇인가요?", "김치는 맛있습니다.", False),  # true perhaps, but not what the table says
    ],
)
def test_faithful_means_every_sentence_is_one_the_table_says_about_the_topic(prompt, answer, faithful):
    assert judge_answer(prompt, answer).faithful is faithful


def test_good_needs_every_rule_and_names_what_failed():
    good = judge_answer("김치는 무엇인가요?", f"{GOOD} 오래 익히면 신맛이 강해집니다.")
    assert good.good and verdict(flags(good)) == "good"
    curt = judge_answer("김치는 무엇인가요?", "김치는 배추 반찬이야.")
    assert not curt.good and verdict(flags(curt)) == "반말"
    other = judge_answer("김치는 무엇인가요?", "서울은 대한민국의 수도입니다.")
    assert not other.good and verdict(flags(other)) == "off topic, unfaithful"
    assert judge_answer("오늘 날씨 어때?", "맑습니다.").good  # no topic of the table: polite is what is judged
    assert judge_answer("오늘 날씨 어때?", "맑습니다.").faithful is None


def test_rates_over_several_answers():
    prompts = ["김치는 무엇인가요?", "서울이 궁금합니다.", "오늘 날씨 어때?", "고래가 궁금합니다."]
    answers = [GOOD, "서울은 대한민국의 수도입니다. 서울은 대한민국의 수도입니다.", "몰라 \ufffd", "I don't know."]
    rates = judge_answers(prompts, answers)
    assert {key: rates[key] for key in JUDGE_KEYS} == {
        "good_rate": 0.25,  # only the kimchi answer: the Seoul one repeats itself
        "broken_rate": 0.25,
        "hangul_share": pytest.approx((1.0 + 1.0 + 1.0 + 0.0) / 4),
        "polite_rate": 0.5,
        "on_topic_rate": pytest.approx(2 / 3),  # the weather prompt names no topic
        "faithful_rate": pytest.approx(2 / 3),
        "repeat_rate": 0.25,
    }
    assert (rates["answers"], rates["on_topic_answers"], rates["unseen"]) == (4, 3, None)
    assert judge_answers(["오늘 날씨 어때?"], ["맑아요."])["on_topic_rate"] is None


def test_topics_held_out_of_sft_are_rated_apart():
    """판다 is held out of SFT: its answers go under `unseen`, never into the headline rates."""
    held_out = [row["name"] for row in json.loads(bundled_data_path("topics").read_text()) if row["held_out"]]
    assert len(held_out) == 15 and "판다" in held_out
    rates = judge_answers(["판다에 대해 알려 주세요.", "김치는 무엇인가요?"], ["판다는 곰입니다.", GOOD])
    assert (rates["answers"], rates["good_rate"], rates["faithful_rate"]) == (1, 1.0, 1.0)
    assert rates["unseen"]["answers"] == 1 and rates["unseen"]["faithful_rate"] == 0.0
    assert rates["unseen"]["on_topic_rate"] == 1.0
    with pytest.raises(ValueError, match="2 answers for 1 prompts"):
        judge_answers(["김치는?"], ["a", "b"])


def test_every_good_bundled_answer_passes_and_every_bad_one_fails_a_rule():
    """The judge encodes the rules the bundled data was generated by: best-ranked answers are good, and nearly every
    curt, mixed, English, off-topic, spliced, drifting, cut-off or repeated answer breaks a rule."""
    assert len(topic_names()) == 100
    records = json.loads(bundled_data_path("rm").read_text(encoding="utf-8"))
    good = bad_caught = bad = 0
    for record in records:
        for index, rank in enumerate(record["ranking"]):
            judged = judge_answer(record["prompt"], record[f"completion_{index}"])
            if rank == 0:
                good += judged.good
            else:
                bad += 1
                bad_caught += not judged.good
    assert good == len(records) == 600
    # Before `faithful`, the rules missed polite answers that drift, splice or stop early (0.6 caught); now every
    # worse-ranked answer fails one.
    assert bad_caught == bad, (bad_caught, bad)


def test_a_conversations_last_answer_is_judged_against_its_own_question():
    """The multi-turn issue's failure: asked "그럼 비빔밥은요?" after 김치, the model answered about 김치 again."""
    from kochat_trl.eval.judge import judge_conversation

    kimchi = "김치는 배추와 고춧가루로 만드는 한국의 발효 음식입니다. 오래 익히면 신맛이 강해집니다."
    bibimbap = "비빔밥은 밥에 나물과 고추장을 넣어 비벼 먹는 음식입니다. 여러 채소를 한 번에 먹을 수 있습니다."
    opening = [{"role": "user", "content": "김치에 대해 알려 주세요."}, {"role": "assistant", "content": kimchi}]
    follow_up = {"role": "user", "content": "그럼 비빔밥은요?"}
    stuck = judge_conversation([*opening, follow_up, {"role": "assistant", "content": kimchi}])
    assert (stuck.on_topic, stuck.faithful, stuck.good) == (False, False, False)
    answered = judge_conversation([*opening, follow_up, {"role": "assistant", "content": bibimbap}])
    assert (answered.on_topic, answered.faithful, answered.good) == (True, True, True)
    half = judge_conversation([*opening, follow_up, {"role": "assistant", "content": "오래 익히면 신맛이 강해집니다."}])
    assert (half.on_topic, half.faithful) == (False, False)  # the transcript's third answer: 김치's sentence alone
    with pytest.raises(ValueError, match="ends with an answer"):
        judge_conversation([*opening, follow_up])


def test_the_held_out_conversations_are_new_questions_about_seen_topics():
    """conversations.json: 30 conversations of 2 turns and 30 of 3, each turn a different topic SFT saw, asked in a
    form no SFT question uses; per-turn rates count each answer against its own question."""
    from kochat_trl.eval.conversations import held_out_conversations, turn_rates
    from kochat_trl.eval.judge import asked_topic, topic_table

    conversations = held_out_conversations()
    assert sorted(len(questions) for questions in conversations) == [2] * 30 + [3] * 30
    sft = json.loads(bundled_data_path("sft").read_text(encoding="utf-8"))
    sft_questions = {message["content"] for row in sft for message in row["messages"] if message["role"] == "user"}
    for questions in conversations:
        topics = [asked_topic(question) for question in questions]
        assert len(set(topics)) == len(topics) and not any(topic_table()[name].held_out for name in topics)
        assert not sft_questions & set(questions)
    two = [["김치에 대해 설명해 주시겠어요?", "그러면 비빔밥은요?"]]
    rates = turn_rates(two, [[GOOD, GOOD]])  # the second answer is about the first question
    assert (rates["turn_1"]["on_topic_rate"], rates["turn_2"]["on_topic_rate"], rates["last"]["answers"]) == (1, 0, 1)
