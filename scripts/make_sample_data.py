"""Generate kochat-trl's bundled Korean sample data (sft.json, rm.json, ppo.json).

The data is written for this project (nothing is copied from elsewhere) in KoChatGPT's file layouts:

- sft.json: ``[{"messages": [{"role", "content"}, ...]}]`` (TRL's conversational layout): single questions and
  conversations of 2 or 3 turns, where each later question is about another topic, asked in full or as a follow-up
  ("그럼 비빔밥은요?"), and each answer is about its own question. Demonstrations of mixed quality, as if by
  several writers (see ``SFT_WRITERS``): half answer in polite, complete 합니다체; the others answer on topic and
  truthfully but in curt 반말. SFT imitates the mix; the preference stages have to pick out the polite part.
- rm.json: ``[{"prompt", "completion_0", "completion_1", "completion_2", "ranking"}]`` where
  ``ranking[i]`` is the rank of ``completion_i`` (0 = best).
- ppo.json: ``[{"prompt"}]``.
- topics.json: ``[{"name", "category", "held_out", "sentences", "curt_sentences"}]``: the topic table, which
  `kochat_trl.eval.judge` reads to tell whether an answer names the asked topic (on topic) and whether every sentence of
  it is one the table says about that topic, in either register (faithful).
- conversations.json: ``[{"questions": [...]}]``: the held-out multi-turn set, 2- and 3-turn conversations about
  topics SFT saw, every question in a form SFT never saw; the model answers each turn itself, and the judge rates
  each answer against its own question.

It is compositional so that a tiny model trained on a CPU in seconds can learn it: a hand-written table
of everyday topics (``scripts/topic_table.jsonl``), each with a short Korean name and two or three short, true
sentences in polite 합니다체, crossed with a handful of question forms; this script holds only the rules. Particles
(은/는, 이/가, 을/를, 이야/야) are chosen from the final consonant (batchim) of the word they attach to.

Held out of SFT entirely: some question forms (``HELD_OUT_FORMS``, ``HELD_OUT_FOLLOW_UPS``) and about 15% of the
topics (drawn per category), so PPO prompts include questions the policy has not been fine-tuned on.

Reward-model records rank three completions consistently, by tier:

    0 good answer  >  1 curt 반말 on topic  >  2 polite but off-topic / truncated / fragment  >  3 English / broken

The polite-but-off-topic answer is a good answer to a *different* topic, so the reward model must read
the question, not just check politeness. The curt answers come in many shapes (the SFT writers' 반말, and
templates ending in 야, 지, 잖아, 거든, 냐), and the worst tier holds single words and repeated words, so the reward
model learns the style it ranks rather than the table's templates.

Run from the repository root (stdlib only, deterministic for a given seed)::

    python scripts/make_sample_data.py            # writes kochat_trl/resources/{sft,rm,ppo,topics,conversations}.json
    python scripts/make_sample_data.py --seed 0 --out-dir /tmp/sample
"""

from __future__ import annotations

import argparse
import json
import random
import re
import unicodedata
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Topics, read from topic_table.jsonl (one JSON record per line): category, name, kind (what a curt 반말 answer
# calls the topic: "김치? 그냥 배추 반찬이야."), defined_as (the first sentence is f"{name}{은/는} {defined_as}", so its
# particle is always right), facts (further sentences) and person (ask "누구인가요?").
# In code a topic is a tuple: (category, name, kind, defined_as, facts, is_person).

Topic = tuple[str, str, str, str, tuple[str, ...], bool]
TOPIC_TABLE = Path(__file__).resolve().parent / "topic_table.jsonl"


def read_topics(path: Path = TOPIC_TABLE) -> list[Topic]:
    topics = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        facts, person = tuple(row["facts"]), row.get("person", False)
        topics.append((row["category"], row["name"], row["kind"], row["defined_as"], facts, person))
    return topics


TOPICS: list[Topic] = read_topics()

# ---------------------------------------------------------------------------------------------
# Question forms. {X} is the topic; {은는}, {이가}, {을를} are particles chosen for the topic.

FORMS: list[str] = [
    "{X}에 대해 알려 주세요.",
    "{X}{은는} 무엇인가요?",  # "누구인가요?" for people
    "{X}의 특징을 설명해 주세요.",
    "{X}{이가} 궁금합니다.",
    "{X}{을를} 소개해 주세요.",
    "{X}에 대해 간단히 설명해 줄 수 있나요?",
    "{X}에 대해 설명해 주시겠어요?",
    "{X}에 관해 무엇을 알고 있나요?",
]
HELD_OUT_FORMS = (5, 6, 7)  # indices into FORMS never used for SFT
# A later turn of a conversation asks about another topic, in full (a form above) or as a follow-up that leans on the
# conversation ("그럼 비빔밥은요?"). Follow-ups never open a conversation.
FOLLOW_UPS: list[str] = [
    "그럼 {X}{은는}요?",
    "{X}{은는} 어때요?",
    "{X}도 알려 주세요.",
    "그러면 {X}{은는}요?",
    "{X}{은는} 어떤가요?",
]
HELD_OUT_FOLLOW_UPS = (3, 4)  # indices into FOLLOW_UPS never used for SFT
SFT_FORMS_PER_TOPIC = 2  # of the 5 SFT forms, how many each SFT topic gets (each answered by every SFT writer)
HELD_OUT_TOPIC_SHARE = 0.15
RM_RECORDS_PER_TOPIC = 6
# Per reward-model record (see TIER below). With 1, PPO found the reward model's favourite polite answer (뜨개질's)
# and gave it to every question (on topic 0.99 -> 0.78 at lr 6e-4).
OTHER_TOPIC_ANSWERS = 2
PPO_PROMPTS_PER_TOPIC = 3
# Multi-turn SFT: conversations of 2 or 3 turns (half each), one opening on every SFT topic, each answered by every
# SFT writer, as the single questions are. Every answer is about its own question, never an earlier one.
SFT_CONVERSATIONS_PER_TOPIC = 3
# The held-out multi-turn set (conversations.json): topics SFT saw, every question in a form SFT never saw.
HELD_OUT_CONVERSATIONS = {2: 30, 3: 30}  # turns: conversations
MAX_ANSWER_CHARS = 90
MAX_SENTENCE_CHARS = 32
# Every SFT question is answered twice, as instruction data collected from several writers is: once in polite,
# complete 합니다체 and once with the same facts in curt 반말. So the SFT model is unsure of the register for every
# question, and RL sees both registers for each one. (With one writer per question, drawn at random, the SFT model
# learned a register per question; PPO rarely sampled the other and moved polite 0.45 -> 0.57 in 960 episodes.)
# (A writer of one clipped sentence, "김치는 배추 반찬이야.", made the tiny SFT model splice topics:
# greedy answers to 7 of 51 held-out questions mixed two topics' facts, sampled answers were faithful 0.54 of the
# time against 0.90 without it. Clipped answers stay among the RM's negatives.)
SFT_WRITERS = ("polite", "banmal")

# ---------------------------------------------------------------------------------------------
# Bad answers for the reward model.

CURT_ON_TOPIC = [  # 반말, on topic; {kind} takes 이야/야, 이잖아/잖아, 이지/지, 이거든/거든, 이냐/냐
    "{X}? 그냥 {kind}{이야}.",
    "{X}{은는} {kind}{이야}. 그것도 몰라?",
    "{X}? {kind}{이잖아}. 됐지?",
    "{X}? 그거 {kind}{이야}. 끝.",
    "{X}? 뭐, {kind}{이지}.",
    "{X}{은는} 그냥 {kind}{이야}. 별거 없어.",
    "{X}{은는} {kind}{이거든}.",
    "{kind}{이잖아}.",
    "{X}{은는} {kind}{이지} 뭐.",
    "그것도 몰라? {kind}{이잖아}.",
    "{X}? {kind}{이냐고}? 맞아.",
    "{kind}{이야}.",
]
ENGLISH = [  # English or mixed, no real answer
    "I don't know.",
    "Sorry, I can't help with that.",
    "No idea. Ask someone else.",
    "{X}? I'm not sure.",
    "Hmm, {X}... I don't know much about it.",
    "That is a hard question. Next.",
]
CURT_OFF_TOPIC = [  # 반말, says nothing about the topic
    "몰라.",
    "응.",
    "글쎄.",
    "뭐래.",
    "그건 왜 물어?",
    "귀찮아. 나중에 물어봐.",
    "알아서 찾아봐.",
    "그런 거 관심 없어.",
    "다른 거 물어봐.",
]
# Tiers: lower is better. Each record ranks the good answer, a polite answer to another topic's question, and
# one more bad answer. A polite answer that is wrong in content (about another topic, drifting to another
# topic, spliced from two sentences, repeating itself, or cut off) ranks below the curt on-topic answer; answers
# of the same tier tie (equal ranks carry no preference and are skipped as pairs).
TIER = {
    "good": 0,
    "curt": 1,
    "mixed": 1,
    "other_topic": 2,
    "drifted": 2,
    "spliced": 2,
    "swapped": 2,
    "repeated": 2,
    "truncated": 2,
    "fragment": 2,
    "english": 3,
    "curt_off": 3,
    "single_word": 3,
    "word_repeat": 3,
}
# Why every record has the other-topic answer: each good answer then appears as often rejected (for another
# topic's question) as chosen, so a reward model cannot score the answer text alone and has to read the
# question. With it in 1 of 12 records the tiny reward model scored the policy's off-topic answers as high as
# its on-topic ones (6.29 vs 6.43), and PPO against it could not make answers more on topic. The third answer:
# a reward model that never saw a repeated sentence or a sentence spliced from two topics rewarded both, and PPO
# learned to repeat itself and to ramble (measured on the tiny default with kochat_trl.eval.judge).
# The curt answer (the SFT writers' 반말 among them) is the third answer in about 40 % of the records: it is what the
# reward model must teach PPO to leave. Fragments, single words and repeated words make it rank answers it never saw
# (everyday questions outside the table, tests/data/rm_generalisation.json) by their style.
THIRD_ANSWER_WEIGHT = {
    "curt": 8,
    "mixed": 3,
    "drifted": 2,
    "spliced": 2,
    "swapped": 2,
    "repeated": 2,
    "truncated": 1,
    "fragment": 1,
    "english": 1,
    "curt_off": 1,
    "single_word": 1,
    "word_repeat": 1,
}

# ---------------------------------------------------------------------------------------------
# Korean particles


def has_batchim(word: str) -> bool:
    """Whether the word's last sound closes with a consonant (받침), which picks 은/이/을 over 는/가/를."""
    text = word.strip()
    ch = text[-1]
    if "가" <= ch <= "힣":
        return (ord(ch) - 0xAC00) % 28 != 0
    if ch.isdigit():  # 영 일 이 삼 사 오 육 칠 팔 구
        return ch in "013678"
    if ch.isascii() and ch.isalpha():  # letter names: 엘 엠 엔 알 end in a consonant
        return ch.upper() in "LMNR"
    raise ValueError(f"cannot choose a particle after {word!r}")


def particles(word: str) -> dict[str, str]:
    b = has_batchim(word)
    return {
        "은는": "은" if b else "는",
        "이가": "이" if b else "가",
        "을를": "을" if b else "를",
        "이야": "이야" if b else "야",
        "이잖아": "이잖아" if b else "잖아",
        "이지": "이지" if b else "지",
        "이거든": "이거든" if b else "거든",
        "이냐고": "이냐고" if b else "냐고",
    }


def fill(template: str, name: str, kind: str = "") -> str:
    """Fill {X} and the particles after it; {이야}-style particles attach to {kind}."""
    topic_p = particles(name)
    kind_p = particles(kind) if kind else {}
    out = template.replace("{X}", name).replace("{kind}", kind)
    for key in ("은는", "이가", "을를"):
        out = out.replace("{" + key + "}", topic_p[key])
    for key in ("이야", "이잖아", "이지", "이거든", "이냐고"):
        out = out.replace("{" + key + "}", kind_p.get(key, ""))
    return out


# ---------------------------------------------------------------------------------------------
# 반말: the same sentence, curt. The table's sentences end in a handful of regular 합니다체 endings (…입니다,
# …합니다, …됩니다, …습니다); the rest are listed. `check` converts every sentence, so a new topic whose
# ending is missing here fails loudly.

BANMAL_WORDS = {
    "쓰입니다": "쓰여",
    "보입니다": "보여",
    "덥습니다": "더워",
    "돕습니다": "도와",
    "줍니다": "줘",
    "삽니다": "살아",
    "나옵니다": "나와",
    "옵니다": "와",
    "봅니다": "봐",
    "뛰어납니다": "뛰어나",
    "올라옵니다": "올라와",
    "흐릅니다": "흘러",
    "일으킵니다": "일으켜",
    "부릅니다": "불러",
    "내보냅니다": "내보내",
    "떨어집니다": "떨어져",
    "일어납니다": "일어나",
    "이루어집니다": "이루어져",
    "강해집니다": "강해져",
    "핍니다": "펴",
    "거둡니다": "거둬",
    "둡니다": "둬",
    "지냅니다": "지내",
}


def _vowel_and_final(syllable: str) -> tuple[int, int]:
    code = ord(syllable) - 0xAC00
    return (code % 588) // 28, code % 28


def banmal_word(word: str) -> str:
    """The last word of a 합니다체 sentence in 반말: 음식입니다 → 음식이야, 유명합니다 → 유명해, 있습니다 → 있어."""
    if word in BANMAL_WORDS:
        return BANMAL_WORDS[word]
    if word.endswith("입니다"):
        noun = word[: -len("입니다")]
        return noun + ("이야" if has_batchim(noun) else "야")
    if word.endswith("합니다"):
        return word[: -len("합니다")] + "해"
    if word.endswith("됩니다"):
        return word[: -len("됩니다")] + "돼"
    if word.endswith("습니다"):
        stem = word[: -len("습니다")]
        vowel, final = _vowel_and_final(stem[-1])
        bright = vowel in (0, 8) and final != 20  # ㅏ/ㅗ take 아; a past tense (ㅆ: 했, 었, 았) takes 어
        return stem + ("아" if bright else "어")
    raise ValueError(f"no 반말 for {word!r}: add it to BANMAL_WORDS")


def banmal(text: str) -> str:
    """Every sentence of a 합니다체 text in 반말, the facts unchanged."""
    sentences = [sentence.rstrip(".") for sentence in text.split(". ")]
    curt = []
    for sentence in sentences:
        *head, last = sentence.split(" ")
        curt.append(" ".join([*head, banmal_word(last)]))
    return ". ".join(curt) + "."


def clipped(topic: Topic) -> str:
    """One clipped 반말 sentence that is still true: the topic and what kind of thing it is."""
    _, name, kind, _, _, _ = topic
    return fill("{X}{은는} {kind}{이야}.", name, kind)


def topic_sentences(topic: Topic) -> tuple[list[str], list[str]]:
    """What the table says about a topic: its 합니다체 sentences, and the same in 반말 plus the clipped one."""
    polite = [first_sentence(topic), *topic[4]]
    return polite, [*(banmal(sentence) for sentence in polite), clipped(topic)]


# ---------------------------------------------------------------------------------------------
# Builders


def question(topic: Topic, form: int) -> str:
    _, name, _, _, _, is_person = topic
    template = FORMS[form]
    if is_person:
        template = template.replace("무엇인가요?", "누구인가요?")
    return fill(template, name)


def follow_up(topic: Topic, form: int) -> str:
    return fill(FOLLOW_UPS[form], topic[1])


def later_question(topic: Topic, forms: list[int], follow_ups: list[int], rng: random.Random) -> str:
    """A later turn's question: in full or as a follow-up, half each."""
    if rng.random() < 0.5:
        return follow_up(topic, rng.choice(follow_ups))
    return question(topic, rng.choice(forms))


def conversation_questions(
    opener: Topic, turns: int, pool: list[Topic], forms: list[int], follow_ups: list[int], rng: random.Random
) -> list[tuple[Topic, str]]:
    """One conversation's topics and questions: `opener` first, then `turns - 1` other topics of `pool`, all
    distinct."""
    topics = [opener, *rng.sample([topic for topic in pool if topic[1] != opener[1]], turns - 1)]
    questions = [question(opener, rng.choice(forms)), *(later_question(t, forms, follow_ups, rng) for t in topics[1:])]
    return list(zip(topics, questions, strict=True))


def answer_as(writer: str, topic: Topic, rng: random.Random) -> str:
    answer = rng.choice(good_answers(topic))
    return banmal(answer) if writer == "banmal" else answer


def messages(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    """(question, answer) turns as chat messages."""
    return [
        message
        for question_text, answer in turns
        for message in ({"role": "user", "content": question_text}, {"role": "assistant", "content": answer})
    ]


def first_sentence(topic: Topic) -> str:
    _, name, _, predicate, _, _ = topic
    return f"{name}{particles(name)['은는']} {predicate}"


def good_answers(topic: Topic) -> list[str]:
    """Every good answer for a topic: the defining sentence plus one or more further facts."""
    head, rest = first_sentence(topic), topic[4]
    options = [f"{head} {fact}" for fact in rest]
    if len(rest) > 1:
        options.append(" ".join([head, *rest]))
    return [o for o in options if len(o) <= MAX_ANSWER_CHARS]


def truncate(answer: str, rng: random.Random) -> str:
    """Cut a good answer off in the middle of a sentence: polite so far, but unfinished."""
    sentences = answer.split(". ")
    index = rng.randrange(len(sentences))
    words = sentences[index].rstrip(".").split(" ")
    # keep at least half the words (and more than the topic alone), never the whole sentence
    low = min(max(1 if index else 2, (len(words) + 1) // 2), len(words) - 1)
    keep = rng.randint(low, len(words) - 1)
    cut = " ".join(words[:keep])
    prefix = ". ".join(sentences[:index])
    return f"{prefix}. {cut}" if prefix else cut


def other_sentence(topic: Topic, rng: random.Random) -> str:
    """A true sentence about a different topic (one of its further facts)."""
    other = rng.choice([t for t in TOPICS if t[1] != topic[1]])
    return rng.choice(other[4])


def drift(answer: str, topic: Topic, rng: random.Random) -> str:
    """Start on topic, then change the subject: the last sentence is a fact about another topic."""
    sentences = answer.split(". ")
    kept = sentences[:-1] if len(sentences) > 1 else sentences
    return ". ".join([*(sentence.rstrip(".") for sentence in kept), other_sentence(topic, rng)])


def splice(answer: str, topic: Topic, rng: random.Random) -> str:
    """Word salad that still ends politely: the first words of the answer, then the tail of another topic's sentence."""
    words, tail = answer.split(". ")[0].split(" "), other_sentence(topic, rng).split(" ")
    head = words[: rng.randint(2, max(2, len(words) - 1))]
    return " ".join([*head, *tail[rng.randint(1, len(tail) - 1) :]]) if len(tail) > 1 else " ".join([*head, *tail])


def repeat(answer: str, rng: random.Random) -> str:
    """The answer with one of its sentences said twice in a row."""
    sentences = [sentence.rstrip(".") for sentence in answer.split(". ")]
    index = rng.randrange(len(sentences))
    return ". ".join([*sentences[: index + 1], *sentences[index:]]) + "."


def fragment(answer: str, rng: random.Random) -> str:
    """A clipped phrase with no ending at all: the first few words of one sentence ("김치는 배추와 고춧가루로")."""
    words = rng.choice(answer.split(". ")).rstrip(".").split(" ")
    return " ".join(words[: rng.randint(1, max(1, len(words) - 1))])


def negative(kind: str, topic: Topic, good: str, rng: random.Random) -> str:
    name, curt_noun = topic[1], topic[2]
    if kind == "curt":  # half the SFT writers' 반말 (same facts), else one clipped sentence or a rude template
        shape = rng.randrange(4)
        if shape < 2:
            return banmal(good)
        return clipped(topic) if shape == 2 else fill(rng.choice(CURT_ON_TOPIC), name, curt_noun)
    if kind == "mixed":  # slips into 반말 halfway: polite sentences, then the rest curt (or the other way round)
        parts = good.split(". ")
        if len(parts) == 1:
            return banmal(good)
        cut = rng.randrange(1, len(parts))
        head, tail = ". ".join(parts[:cut]) + ".", ". ".join(parts[cut:])
        return f"{head} {banmal(tail)}" if rng.random() < 0.7 else f"{banmal(head)} {tail}"
    if kind == "swapped":  # the asked topic's name on another topic's facts ("경주는 재료를 손질해 ... 일입니다.")
        other = rng.choice([t for t in TOPICS if t[1] != name])
        return " ".join([f"{name}{particles(name)['은는']} {other[3]}", *other[4][: rng.randint(0, 1)]])
    if kind == "fragment":
        return fragment(good, rng)
    if kind == "single_word":
        return rng.choice([name, curt_noun, f"{name}.", f"{curt_noun}?"])
    if kind == "word_repeat":
        word = rng.choice([name, curt_noun.split(" ")[-1], rng.choice(good.rstrip(".").split(" "))])
        return " ".join([word] * rng.randint(3, 6))
    if kind == "other_topic":  # a good answer, but to another topic
        pool = [t for t in TOPICS if t[1] != name]
        return rng.choice(good_answers(rng.choice(pool)))
    if kind == "drifted":
        return drift(good, topic, rng)
    if kind == "spliced":
        return splice(good, topic, rng)
    if kind == "repeated":
        return repeat(good, rng)
    if kind == "truncated":
        return truncate(good, rng)
    if kind == "english":
        return fill(rng.choice(ENGLISH), name)
    if kind == "curt_off":
        return rng.choice(CURT_OFF_TOPIC)
    raise ValueError(kind)


def choose_held_out_topics(rng: random.Random) -> set[str]:
    held: set[str] = set()
    for category in dict.fromkeys(t[0] for t in TOPICS):
        names = [t[1] for t in TOPICS if t[0] == category]
        count = max(1, round(len(names) * HELD_OUT_TOPIC_SHARE))
        held.update(rng.sample(names, count))
    return held


def build(seed: int) -> tuple[list[dict], list[dict], list[dict], dict]:
    rng = random.Random(seed)  # held-out topics and SFT
    rm_rng, ppo_rng = random.Random(f"{seed}:rm"), random.Random(f"{seed}:ppo")  # tuning one set moves no other
    held_topics = choose_held_out_topics(rng)
    sft_forms = [i for i in range(len(FORMS)) if i not in HELD_OUT_FORMS]

    sft = []
    for topic in TOPICS:
        if topic[1] in held_topics:
            continue
        for form in sorted(rng.sample(sft_forms, SFT_FORMS_PER_TOPIC)):
            for writer in SFT_WRITERS:
                sft.append({"messages": messages([(question(topic, form), answer_as(writer, topic, rng))])})
    rng.shuffle(sft)

    # Conversations (their own generator: the single questions above are as before).
    seen_topics = [topic for topic in TOPICS if topic[1] not in held_topics]
    sft_follow_ups = [i for i in range(len(FOLLOW_UPS)) if i not in HELD_OUT_FOLLOW_UPS]
    talk_rng = random.Random(f"{seed}:conversations")
    conversations = []
    for index, opener in enumerate(seen_topics * SFT_CONVERSATIONS_PER_TOPIC):
        turns = conversation_questions(opener, 2 + index % 2, seen_topics, sft_forms, sft_follow_ups, talk_rng)
        for writer in SFT_WRITERS:
            answered_turns = [(text, answer_as(writer, topic, talk_rng)) for topic, text in turns]
            conversations.append({"messages": messages(answered_turns)})
    sft += conversations
    talk_rng.shuffle(sft)

    held_rng = random.Random(f"{seed}:held-out conversations")
    held_out_conversations = []
    for turns, count in HELD_OUT_CONVERSATIONS.items():
        for opener in held_rng.sample(seen_topics, count):
            questions = conversation_questions(
                opener, turns, seen_topics, list(HELD_OUT_FORMS), list(HELD_OUT_FOLLOW_UPS), held_rng
            )
            held_out_conversations.append({"questions": [text for _, text in questions]})

    kinds, weights = zip(*THIRD_ANSWER_WEIGHT.items(), strict=True)
    rm = []
    for topic in TOPICS:
        for form in rm_rng.sample(range(len(FORMS)), RM_RECORDS_PER_TOPIC):
            good = rm_rng.choice(good_answers(topic))
            third = rm_rng.choices(kinds, weights=weights)[0]
            completions = [("good", good)]
            while len(completions) < 1 + OTHER_TOPIC_ANSWERS:  # distinct other topics' answers
                other = negative("other_topic", topic, good, rm_rng)
                if other not in {text for _, text in completions}:
                    completions.append(("other_topic", other))
            completions.append((third, negative(third, topic, good, rm_rng)))
            rm_rng.shuffle(completions)
            record: dict = {"prompt": question(topic, form)}
            for i, (_, text) in enumerate(completions):
                record[f"completion_{i}"] = text
            tiers = [TIER[kind] for kind, _ in completions]
            record["ranking"] = [sorted(set(tiers)).index(tier) for tier in tiers]  # dense: ties share a rank
            rm.append(record)
    rm_rng.shuffle(rm)

    ppo = []
    for topic in TOPICS:
        forms = [ppo_rng.choice(HELD_OUT_FORMS)]
        forms += ppo_rng.sample([f for f in range(len(FORMS)) if f != forms[0]], PPO_PROMPTS_PER_TOPIC - 1)
        ppo.extend({"prompt": question(topic, form)} for form in forms)
    ppo_rng.shuffle(ppo)

    info = {
        "held_out_topics": sorted(held_topics, key=[t[1] for t in TOPICS].index),
        "held_out_forms": [FORMS[i] for i in HELD_OUT_FORMS],
        "sft_forms": [FORMS[i] for i in sft_forms],
        "held_out_follow_ups": [FOLLOW_UPS[i] for i in HELD_OUT_FOLLOW_UPS],
        "sft_follow_ups": [FOLLOW_UPS[i] for i in sft_follow_ups],
        "conversations": held_out_conversations,
    }
    return sft, rm, ppo, info


# ---------------------------------------------------------------------------------------------
# Checks


def _check_text(text: str, where: str) -> None:
    if not isinstance(text, str) or not text or text != unicodedata.normalize("NFC", text).strip():
        raise AssertionError(f"{where}: empty, not NFC or not stripped: {text!r}")


def _turns(row: dict) -> list[tuple[str, str]]:
    """An SFT record's (question, answer) turns."""
    roles = [message["role"] for message in row["messages"]]
    assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, row
    texts = [message["content"] for message in row["messages"]]
    return list(zip(texts[::2], texts[1::2], strict=True))


def check(sft: list[dict], rm: list[dict], ppo: list[dict], conversations: list[dict]) -> None:
    names = [t[1] for t in TOPICS]
    assert len(set(names)) == len(names), "duplicate topic names"
    for topic in TOPICS:
        for sentence in (first_sentence(topic), *topic[4]):
            assert sentence.endswith("니다."), sentence
            assert len(sentence) <= MAX_SENTENCE_CHARS, (len(sentence), sentence)
        assert good_answers(topic), f"no answer short enough for {topic[1]}"
        for sentence in topic_sentences(topic)[1]:
            assert not sentence.endswith("니다.") and sentence.endswith("."), sentence
    flat_sft = [{"turn": n, "question": q, "answer": a} for row in sft for n, (q, a) in enumerate(_turns(row))]
    for stage, rows in (("sft", flat_sft), ("rm", rm), ("ppo", ppo)):
        for n, row in enumerate(rows):
            for key, value in row.items():
                if key not in ("ranking", "turn"):
                    _check_text(value, f"{stage} record {n} {key}")
    for stage, rows in (("sft", sft), ("rm", rm), ("ppo", ppo), ("conversations", conversations)):
        frozen = [json.dumps(row, ensure_ascii=False, sort_keys=True) for row in rows]
        assert len(set(frozen)) == len(frozen), f"{stage}: duplicate records"
    single = [_turns(row)[0] for row in sft if len(_turns(row)) == 1]
    assert len({question for question, _ in single}) * len(SFT_WRITERS) == len(single), "sft: not once per writer"
    assert len({r["prompt"] for r in ppo}) == len(ppo), "ppo: prompts not distinct"
    for row in flat_sft:
        assert len(row["answer"]) <= MAX_ANSWER_CHARS, row
        # Each answer is about its own question: it names the topic the question names, and no earlier one's.
        assert row["answer"].startswith(asked_topic(row["question"])), row
    polite = sum(row["answer"].endswith("니다.") for row in flat_sft)
    assert polite * len(SFT_WRITERS) == len(flat_sft) * SFT_WRITERS.count("polite"), f"{polite} of {len(flat_sft)}"
    lengths = [len(_turns(row)) for row in sft]
    openers = len(single) // (SFT_FORMS_PER_TOPIC * len(SFT_WRITERS)) * SFT_CONVERSATIONS_PER_TOPIC
    expected = {1: len(single), 2: (openers + 1) // 2 * len(SFT_WRITERS), 3: openers // 2 * len(SFT_WRITERS)}
    assert {n: lengths.count(n) for n in expected} == expected and len(lengths) == sum(expected.values()), expected
    for row in rm:
        texts = [row[f"completion_{i}"] for i in range(len(row["ranking"]))]
        assert row["ranking"].count(0) == 1 and max(row["ranking"]) <= 2 and len(texts) == 2 + OTHER_TOPIC_ANSWERS, row
        assert len(set(texts)) == len(texts), row
        assert texts[row["ranking"].index(0)].endswith("니다."), row
    best_positions = {row["ranking"].index(0) for row in rm}
    assert best_positions == set(range(2 + OTHER_TOPIC_ANSWERS)), "best answer is always in the same position"
    sft_questions = {question for row in sft for question, _ in _turns(row)}
    for row in conversations:
        topics = [asked_topic(text) for text in row["questions"]]
        assert len(set(topics)) == len(topics) and not any(text in sft_questions for text in row["questions"]), row
        assert not set(topics) & held_topic_names(sft), row
    lengths = [len(row["questions"]) for row in conversations]
    assert {n: lengths.count(n) for n in HELD_OUT_CONVERSATIONS} == HELD_OUT_CONVERSATIONS, lengths


def asked_topic(text: str) -> str:
    """The topic a question names: the longest name at a word's start (떡볶이 before 떡, not 고래 inside 돌고래)."""
    names = sorted((t[1] for t in TOPICS), key=len, reverse=True)
    return next(name for name in names if re.search(rf"(?<![가-힣A-Za-z]){re.escape(name)}", text))


def held_topic_names(sft: list[dict]) -> set[str]:
    """The topics no SFT answer is about."""
    answered = {asked_topic(question) for row in sft for question, _ in _turns(row)}
    return {t[1] for t in TOPICS} - answered


def write_json(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        json.dump(rows, handle, ensure_ascii=False, indent=1)
        handle.write("\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-dir", type=Path, default=Path(__file__).resolve().parent.parent / "kochat_trl" / "resources"
    )
    args = parser.parse_args(argv)

    sft, rm, ppo, info = build(args.seed)
    check(sft, rm, ppo, info["conversations"])
    topics = [
        {
            "name": t[1],
            "category": t[0],
            "held_out": t[1] in info["held_out_topics"],
            "sentences": topic_sentences(t)[0],
            "curt_sentences": topic_sentences(t)[1],
        }
        for t in TOPICS
    ]
    files = (("sft", sft), ("rm", rm), ("ppo", ppo), ("topics", topics), ("conversations", info["conversations"]))
    for name, rows in files:
        write_json(args.out_dir / f"{name}.json", rows)
        print(f"{args.out_dir / (name + '.json')}: {len(rows)} records")
    turns = [len(row["messages"]) // 2 for row in sft]
    print("sft:", ", ".join(f"{turns.count(n)} of {n} turn{'s' if n > 1 else ''}" for n in sorted(set(turns))))
    print(f"{len(TOPICS)} topics, {len(FORMS)} question forms, {len(FOLLOW_UPS)} follow-up forms")
    print("SFT forms:", *info["sft_forms"], *info["sft_follow_ups"], sep="\n  ")
    print("held out of SFT, forms:", *info["held_out_forms"], *info["held_out_follow_ups"], sep="\n  ")
    print("held out of SFT, topics:", ", ".join(info["held_out_topics"]))


if __name__ == "__main__":
    main()
