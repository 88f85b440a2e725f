"""The one verifier: tricky replies scored by hand, and every consumer (rewards, tasks, the eval harness, search
votes) agreeing with ``score_answer`` and ``extract_answer`` on each of them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from posttrain.rewards import parse_rewards, score_completions
from posttrain.rewards.verify import extract_answer, generic_score, score_answer, strict_answer
from posttrain.tasks import TASKS, get_task
from posttrain.tasks.answers import fair_answer

# (reply, gold answer, strict, lenient, extracted final answer, fair), each worked out by hand from the rules in
# posttrain/tasks/answers.py. Fair, numeric gold: the final answer's value (= lenient); text gold: the answer span
# (last answer line's value, else last non-empty line) ends with the gold, case included, at a word boundary.
CASES = [
    # Numbers, "Answer:" lines.
    ("Answer: 12", "12", True, True, "12", True),
    ("Answer: 12.", "12", True, True, "12", True),  # a trailing full stop is punctuation
    ("answer: 12", "12", True, True, "12", True),  # the label in any case
    ("ANSWER = 12", "12", True, True, "12", True),
    ("Final answer: 12", "12", True, True, "12", True),
    ("Answer: 012", "12", False, True, "012", True),  # the same value, not as written
    ("Answer: 12  \n\n ", "12", True, True, "12", True),  # trailing spaces and newlines
    ("  \nAnswer:   12\n", "12", True, True, "12", True),
    ("5+7=12 -> 2\nAnswer: 12", "12", True, True, "12", True),
    ("Answer: 12\nAnswer: 13", "12", False, False, "13", False),  # the last answer line counts
    ("Answer: 13\nAnswer: 12", "12", True, True, "12", True),
    ("Answer: 12\nmore text 5", "12", False, True, "12", True),  # an answer line beats later numbers; not last: lenient
    ("Answer: 12 apples", "12", False, True, "12 apples", True),  # numeric gold: the last number of the answer
    ("Answer: twelve", "12", False, False, "twelve", False),
    ("Answer:", "12", False, False, None, False),  # an empty answer is no answer
    ("7+5=12\nAnswer:", "12", False, False, None, False),  # ... even after the right number
    # Numbers without an answer line.
    ("12", "12", True, True, "12", True),  # a bare one-line reply is the answer
    ("12\n", "12", True, True, "12", True),
    ("12.", "12", True, True, "12", True),
    ("the answer is 12", "12", False, True, "12", True),  # last number
    ("the answer is 12.", "12", False, True, "12", True),
    ("12 then 13", "12", False, False, "13", False),
    ("5+7=12\n12", "12", False, True, "12", True),  # the bare answer must be the whole reply
    ("12-5", "12", False, False, "5", False),  # a minus after a digit is a subtraction
    ("", "12", False, False, None, False),
    # Negative numbers.
    ("Answer: -5", "-5", True, True, "-5", True),
    ("x = 3 - 8 = -5", "-5", False, True, "-5", True),
    ("Answer: 5", "-5", False, False, "5", False),
    ("12-5", "-5", False, False, "5", False),
    # Thousands separators.
    ("Answer: 1,200", "1200", False, True, "1,200", True),
    ("Answer: 1200", "1200", True, True, "1200", True),
    ("Answer: 1200", "1,200", False, True, "1200", True),
    ("so 1,200 in all", "1200", False, True, "1,200", True),
    # Words: uppercase (the whole reply is the answer) and free text. Fair is case-sensitive: no credit for "dog".
    ("DOG", "DOG", True, True, "DOG", True),
    (" DOG \n", "DOG", True, True, "DOG", True),
    ("DOG.", "DOG", True, True, "DOG", True),
    ("dog", "DOG", False, True, "dog", False),  # right word, wrong case
    ("it is dog", "DOG", False, True, "dog", False),
    ("DOGS", "DOG", False, False, "DOGS", False),
    ("Answer: DOG", "DOG", True, True, "DOG", True),
    ("Answer: dog", "DOG", False, True, "dog", False),
    ("DOG\nCAT", "DOG", False, False, "CAT", False),
    ("Answer: Paris", "Paris", True, True, "Paris", True),
    ("I think Paris.", "Paris", False, True, "Paris", True),  # the span "I think Paris" ends with "Paris"
    ("Parisian", "Paris", False, False, "Parisian", False),
    ("Answer: Paris\nAnswer: London", "Paris", False, False, "London", False),
    ("", "DOG", False, False, None, False),
]
IDS = [f"{i}:{reply!r}->{gold}" for i, (reply, gold, *_) in enumerate(CASES)]


@pytest.mark.parametrize("reply, gold, strict, lenient, extracted, fair", CASES, ids=IDS)
def test_score_answer_and_extract_answer_by_hand(reply, gold, strict, lenient, extracted, fair):
    assert score_answer(reply, gold) == (strict, lenient)
    assert fair_answer(reply, gold) == fair
    if strict:  # a reply in the expected format that is right is fair-correct too
        assert fair
    assert extract_answer(reply) == extracted
    assert generic_score(reply, gold) == (strict, lenient)  # the former name is the same function
    if strict:  # a strictly correct reply always gives the gold as its final answer, as written
        assert strict_answer(reply) == extracted == gold.rstrip(".")


def test_rewards_agree():
    replies, golds = [c[0] for c in CASES], [c[1] for c in CASES]
    scores = score_completions(parse_rewards(["correct", "correct_lenient"]), replies, [{"answer": g} for g in golds])
    assert scores.per_function["correct"].tolist() == [float(c[2]) for c in CASES]
    assert scores.per_function["correct_lenient"].tolist() == [float(c[3]) for c in CASES]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_scores_with_the_one_scorer(name):
    task = get_task(name)
    assert [task.score(reply, gold) for reply, gold, *_ in CASES] == [(c[2], c[3]) for c in CASES]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_gold_completions_of_the_test_splits_are_strictly_correct(name):
    rows = get_task(name).rows("test")
    column = "chosen" if name == "arithmetic_prefs" else "completion"
    scores = [score_answer(r[column][0]["content"], r["answer"]) for r in rows]
    assert scores == [(True, True)] * len(rows)
    assert [extract_answer(r[column][0]["content"]) for r in rows] == [r["answer"] for r in rows]


class FakeEngine:
    """Answers every prompt with fixed replies; records the prompts and sampling parameters it was given."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts, self.calls = tokenizer, texts, []

    def generate(self, prompts, params, *, seed):
        self.calls.append((prompts, params, seed))
        return SimpleNamespace(texts=self.texts)


def test_heldout_accuracy_agrees_row_by_row(tokenizer):
    from posttrain.eval.harness import heldout_accuracy
    from posttrain.rollout import SamplingParams

    for reply, gold, strict, lenient, _, fair in CASES:
        engine = FakeEngine(tokenizer, [reply])
        row = {"prompt": [{"role": "user", "content": "q"}], "answer": gold}
        result = heldout_accuracy(engine, [row], max_new_tokens=7)
        assert result == {
            "eval_accuracy_strict": float(strict),
            "eval_accuracy_lenient": float(lenient),
            "eval_accuracy_fair": float(fair),
        }
        [(prompts, params, seed)] = engine.calls
        assert len(prompts) == 1 and "q" in prompts[0]
        assert (params, seed) == (SamplingParams(n=1, temperature=0.0, max_new_tokens=7), 0)


def test_harness_accuracy_agrees(monkeypatch, tmp_path, tokenizer):
    from posttrain.config import EvalConfig, build_config
    from posttrain.eval import harness
    from posttrain.eval.generate import Generations

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": c[1]}) + "\n" for i, c in enumerate(CASES)))
    monkeypatch.setattr(harness, "generate_texts", lambda *a, **kw: Generations([[c[0]] for c in CASES], 0))
    cfg = build_config(EvalConfig, {"model": "unused", "data": str(data), "show_examples": 9}, path="eval")
    result = harness.evaluate_model(None, tokenizer, cfg)
    assert result["accuracy_strict"] == pytest.approx(sum(c[2] for c in CASES) / len(CASES))
    assert result["accuracy_lenient"] == pytest.approx(sum(c[3] for c in CASES) / len(CASES))
    assert result["accuracy_fair"] == pytest.approx(sum(c[5] for c in CASES) / len(CASES))
    marks = [(e["strict"], e["lenient"], e["fair"]) for e in result["examples"]]
    assert marks == [(c[2], c[3], c[5]) for c in CASES[:9]]
    # Built-in tasks and user rows go through the same strict/lenient scorer; fair is the task's own rule.
    task_cfg = SimpleNamespace(task="uppercase", data=None)
    for scorer in (harness._rows_and_scorer(task_cfg)[1], harness._rows_and_scorer(cfg)[1]):
        assert [scorer(c[0], c[1])[:2] for c in CASES] == [score_answer(c[0], c[1]) for c in CASES]


def test_search_votes_for_the_extracted_answer():
    from posttrain.search import extract_answer as search_extract
    from posttrain.search import majority_vote

    assert search_extract is extract_answer
    for reply, gold, strict, _, extracted, _ in CASES:
        winner, count = majority_vote([search_extract(reply), "999", search_extract(reply)])
        if extracted is None:
            assert (winner, count) == ("999", 1.0)
        else:
            assert (winner, count) == (extracted, 2.0)
        if strict:
            assert winner == gold.rstrip(".")
