"""The fair score: replies a real instruct model gives (SmolLM2-135M-Instruct's failure modes included), scored by
hand for each task's declared rule; and every place that reports it (eval greedy/sample and search, GRPO's held-out
accuracy, the recipe suite and its retention, the stage table)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from posttrain.eval.generate import Generations
from posttrain.tasks import TASKS, Task, get_task
from posttrain.tasks.answers import fair_answer, fair_number, fair_text, score_answer

# (task, reply, gold, strict, lenient, fair), worked out by hand from the rules in posttrain/tasks/answers.py.
# Fair, numeric gold: the final answer (last answer line, else last number) has the gold's value. Fair, text
# gold: the answer span (last answer line's value, else last non-empty line, its ends stripped of punctuation,
# quotes, markdown) ends with the gold as written, case included, at a word boundary.
CASES = [
    # Arithmetic: the working is free, the final number counts.
    ("arithmetic", "2 + 3 = 5", "5", False, True, True),  # SmolLM2: the sum written out, no "Answer:" line
    ("arithmetic", "47 + 285 = 332", "332", False, True, True),
    ("arithmetic", "The answer is 332 shells.", "332", False, True, True),
    ("arithmetic", "Answer: 332", "332", True, True, True),
    ("arithmetic", "Answer: 332 shells\nHope that helps!", "332", False, True, True),  # the answer line wins
    ("arithmetic", "89 * 115 = 9225.\n\nSo, there are ", "204", False, False, False),  # SmolLM2, cut off
    ("arithmetic", "332, no wait, 333", "332", False, False, False),  # the last number
    ("arithmetic", "Answer: three hundred thirty-two", "332", False, False, False),
    ("arithmetic_prefs", "so 47+285 = 332", "332", False, True, True),  # scored like arithmetic
    # Uppercase: only the exact capitals count, wherever the chatter around them.
    ("uppercase", "The uppercase version is: hello world", "HELLO WORLD", False, False, False),  # lenient: "world"
    ("uppercase", "The uppercase version is: plomk", "PLOMK", False, True, False),  # lenient's last word, any case
    ("uppercase", "HELLO WORLD", "HELLO WORLD", True, True, True),
    ("uppercase", "Sure! Here it is:\nHELLO WORLD", "HELLO WORLD", False, False, True),
    ("uppercase", "PLOMK", "PLOMK", True, True, True),
    ("uppercase", "plomk", "PLOMK", False, True, False),  # echoing the input
    ("uppercase", "Write in capitals: plomk", "PLOMK", False, True, False),  # echoing the question
    ("uppercase", "Plomk", "PLOMK", False, True, False),
    ("uppercase", "Here it is:\nPLOMK", "PLOMK", False, True, True),
    ("uppercase", "The word 'plomk' in capitals is 'PLOMK'.", "PLOMK", False, True, True),
    ("uppercase", "**PLOMK**", "PLOMK", False, True, True),  # markdown around the answer
    ("uppercase", "Answer: PLOMK\nHope that helps!", "PLOMK", False, True, True),  # the answer line wins
    ("uppercase", "LIC:\nLIC:\nLIC:", "LIC", False, True, True),  # SmolLM2 repeating the right capitals
    ("uppercase", "Wylv:\n\nWylv:", "WYLV", False, True, False),  # SmolLM2 repeating the wrong case
    ("uppercase", "plomk PLOMK", "PLOMK", False, True, True),  # the right one last
    ("uppercase", "PLOMK plomk", "PLOMK", False, True, False),  # a hedge with the wrong case last
    ("uppercase", "XPLOMK", "PLOMK", False, False, False),  # not at a word boundary
    ("uppercase", "PLOMK\n\nI hope this helps!", "PLOMK", False, False, False),  # the last line is chatter
    ("uppercase", "PLOMK is the word in capitals.", "PLOMK", False, False, False),
    ("uppercase", "", "PLOMK", False, False, False),
]
IDS = [f"{i}:{task}:{reply!r}" for i, (task, reply, *_) in enumerate(CASES)]


@pytest.mark.parametrize("task, reply, gold, strict, lenient, fair", CASES, ids=IDS)
def test_fair_score_by_hand(task, reply, gold, strict, lenient, fair):
    from posttrain.eval.harness import marks_scorer

    assert marks_scorer(get_task(task))(reply, gold) == (strict, lenient, fair)
    assert get_task(task).fair(reply, gold) == fair
    assert fair_answer(reply, gold) == fair  # user rows with these golds get the same verdict
    assert get_task(task).score(reply, gold) == score_answer(reply, gold) == (strict, lenient)  # unchanged


def test_each_task_declares_its_rule():
    # "Answer: 012" for 12: the value is right (fair_number), the text "012" does not end with "12" (fair_text).
    assert fair_number("Answer: 012", "12") and not fair_text("Answer: 012", "12")
    assert get_task("arithmetic").fair("Answer: 012", "12")
    assert get_task("arithmetic_prefs").fair("Answer: 012", "12")
    assert not get_task("uppercase").fair("Answer: 012", "12")
    assert type(get_task("arithmetic")).fair is not Task.fair and type(get_task("uppercase")).fair is not Task.fair

    class Plain(Task):  # a task that declares nothing gets the generic rule, like user rows
        name = "plain"

        def example(self, rng):
            return "q", "a", "a"

    assert Plain().fair("Answer: 012", "12") and not Plain().fair("it is dog", "DOG")


def test_arithmetic_fair_is_the_lenient_rule():
    """One definition: for a numeric gold, fair is lenient, on every reply shape and on every task with numbers."""
    shapes = [
        "{g}",
        "Answer: {g}",
        "so it is {g}.",
        "{g}, no {h}",
        "{h}, no {g}",
        "Answer: {g}\nmore {h}",
        "Answer: {h}\nAnswer: {g}",
        "Answer: 0{g}",
        "Answer:",
        "x = {h} - 1 = {g}",
        "{h}-{g}",
        "",
    ]
    for name in ("arithmetic", "arithmetic_prefs"):
        task = get_task(name)
        for row in task.rows("test", 40):
            gold, other = row["answer"], str(int(row["answer"]) + 1)
            for shape in shapes:
                reply = shape.format(g=gold, h=other)
                assert task.fair(reply, gold) == score_answer(reply, gold)[1], (name, reply, gold)


def test_echoing_the_input_earns_no_fair_credit_on_the_whole_uppercase_test_split():
    task = get_task("uppercase")
    rows = task.rows("test")
    words = [r["question"].removeprefix("Write in capitals: ") for r in rows]
    assert [w.upper() for w in words] == [r["answer"] for r in rows]

    def accuracy(replies):
        marks = [(*task.score(reply, r["answer"]), task.fair(reply, r["answer"])) for reply, r in zip(replies, rows)]
        return tuple(sum(m[j] for m in marks) / len(rows) for j in range(3))

    # (strict, lenient, fair) over all 500 rows, by the rules: an echo is lenient-right and fair-wrong everywhere.
    assert accuracy(words) == (0.0, 1.0, 0.0)
    assert accuracy([r["question"] for r in rows]) == (0.0, 1.0, 0.0)
    assert accuracy([w.capitalize() for w in words]) == (0.0, 1.0, 0.0)
    assert accuracy([f"The uppercase version is: {w}" for w in words]) == (0.0, 1.0, 0.0)
    assert accuracy([f"Sure! Here it is:\n{w.upper()}" for w in words]) == (0.0, 1.0, 1.0)
    assert accuracy([w.upper() for w in words]) == (1.0, 1.0, 1.0)


def test_a_strictly_right_reply_is_fair_right_even_for_a_punctuation_gold():
    # "?" is strict for the gold "?" (the bare reply), but its answer span, stripped of punctuation, is empty.
    assert score_answer("?", "?")[0] and fair_text("?", "?") and fair_answer("?", "?")
    assert not fair_text("!", "?")


def test_the_harness_uses_the_tasks_declared_rule(monkeypatch, tokenizer):
    from posttrain.config import EvalConfig, build_config
    from posttrain.eval import harness

    rows = get_task("uppercase").rows("test", 4)
    replies = _uppercase_replies(rows)
    monkeypatch.setattr(type(get_task("uppercase")), "fair", lambda self, reply, gold: reply == replies[3])
    monkeypatch.setattr(harness, "generate_texts", lambda *a, **kw: Generations([[t] for t in replies], 0))
    cfg = build_config(EvalConfig, {"task": "uppercase", "limit": 4}, path="eval")
    assert harness.evaluate_model(None, tokenizer, cfg)["accuracy_fair"] == 0.25  # only the declared rule's pick


@pytest.mark.parametrize("name", sorted(TASKS))
def test_gold_completions_are_fair_correct(name):
    rows = get_task(name).rows("test", 100)
    column = "chosen" if name == "arithmetic_prefs" else "completion"
    assert all(get_task(name).fair(r[column][0]["content"], r["answer"]) for r in rows)


def _uppercase_replies(rows):
    """Replies to four rows: right, the word echoed in lowercase, right after a lead-in line, the question echoed."""
    w = [r["question"].removeprefix("Write in capitals: ") for r in rows]
    return [w[0].upper(), w[1], f"Here it is:\n{w[2].upper()}", f"Write in capitals: {w[3]}"]


def test_harness_reports_fair_accuracy_and_keeps_examples(monkeypatch, tokenizer):
    from posttrain.config import EvalConfig, build_config
    from posttrain.eval import harness

    rows = get_task("uppercase").rows("test", 4)
    replies = _uppercase_replies(rows)
    monkeypatch.setattr(harness, "generate_texts", lambda *a, **kw: Generations([[t] for t in replies], 0))
    cfg = build_config(EvalConfig, {"task": "uppercase", "limit": 4, "show_examples": 3}, path="eval")
    result = harness.evaluate_model(None, tokenizer, cfg)
    # strict: row 0; lenient: all four (case ignored, last word); fair: rows 0 and 2.
    assert (result["accuracy_strict"], result["accuracy_lenient"], result["accuracy_fair"]) == (0.25, 1.0, 0.5)
    assert [(e["completion"], e["strict"], e["lenient"], e["fair"]) for e in result["examples"]] == [
        (replies[0], True, True, True),
        (replies[1], False, True, False),
        (replies[2], False, True, True),
    ]
    assert (
        result["examples"][0]["answer"] == rows[0]["answer"] and rows[0]["question"] in result["examples"][0]["prompt"]
    )


def test_search_reports_fair_accuracy_and_keeps_examples(monkeypatch, tokenizer):
    import posttrain.search
    from posttrain.config import EvalConfig, build_config
    from posttrain.eval import harness
    from posttrain.search import SearchResult

    rows = get_task("uppercase").rows("test", 4)
    replies = _uppercase_replies(rows)

    def fake_search(model, tok, given, spec, helper=None):
        assert [r["answer"] for r in given] == [r["answer"] for r in rows]
        return [SearchResult(t, None, candidates=[t, replies[0]], tokens=3, forward_passes=1) for t in replies]

    monkeypatch.setattr(posttrain.search, "search", fake_search)
    values = {"task": "uppercase", "limit": 4, "strategy": "best_of_n", "n": 2, "show_examples": 2}
    result = harness.evaluate_model(None, tokenizer, build_config(EvalConfig, values, path="eval"))
    assert (result["accuracy_strict"], result["accuracy_lenient"], result["accuracy_fair"]) == (0.25, 1.0, 0.5)
    assert [(e["completion"], e["strict"], e["lenient"], e["fair"]) for e in result["examples"]] == [
        (replies[0], True, True, True),
        (replies[1], False, True, False),
    ]
    assert rows[1]["question"] in result["examples"][1]["prompt"]  # the rendered prompt, as in the greedy path
    values["show_examples"] = 0
    assert harness.evaluate_model(None, tokenizer, build_config(EvalConfig, values, path="eval"))["examples"] == []


def test_heldout_accuracy_takes_a_tasks_fair_rule(tokenizer):
    from posttrain.eval.harness import heldout_accuracy

    engine = SimpleNamespace(tokenizer=tokenizer, generate=lambda p, s, seed: SimpleNamespace(texts=["Answer: 012"]))
    row = [{"prompt": "q", "answer": "12"}]
    assert heldout_accuracy(engine, row, 4)["eval_accuracy_fair"] == 1.0  # generic: a numeric gold, by value
    assert heldout_accuracy(engine, row, 4, fair=get_task("uppercase").fair)["eval_accuracy_fair"] == 0.0


def test_suite_reports_fair_accuracy_and_fair_retention(monkeypatch, capsys):
    from posttrain import pipeline
    from posttrain.eval import harness
    from posttrain.models import loading
    from posttrain.report import print_stage_table

    # Hand-picked per-task results: the suite copies the target's three accuracies and averages retention.
    results = {
        "arithmetic": (0.5, 0.75, 0.625),
        "uppercase": (0.028, 0.61, 0.01),
        "arithmetic_prefs": (0.25, 0.5, 0.5),
    }
    seen = []

    def fake_evaluate(model, tok, cfg, helper=None):
        strict, lenient, fair = results[cfg.task]
        return {
            "accuracy": strict,
            "accuracy_strict": strict,
            "accuracy_lenient": lenient,
            "accuracy_fair": fair,
            "rows": 4,
            "tokens_per_question": 2.0,
            "wall_s": 0.5,
        }

    monkeypatch.setattr(harness, "evaluate_model", fake_evaluate)
    monkeypatch.setattr(harness, "perplexity", lambda model, tok, source: seen.append(source) or 7.0)
    model = SimpleNamespace(to=lambda device: None, parameters=lambda: [torch.zeros(3, 4), torch.zeros(5)])
    monkeypatch.setattr(loading, "load_model", lambda spec: (model, None))
    recipe = {"evaluate": {"tasks": ["arithmetic", "uppercase", "arithmetic_prefs"]}}
    out = pipeline.run_suite("m", recipe, progress=False)
    assert (out["accuracy"], out["accuracy_lenient"], out["accuracy_fair"]) == (0.5, 0.75, 0.625)
    assert out["retention"] == {"uppercase": 0.028, "arithmetic_prefs": 0.25}
    assert out["retention_fair"] == {"uppercase": 0.01, "arithmetic_prefs": 0.5}
    assert out["retention_accuracy"] == pytest.approx((0.028 + 0.25) / 2)
    assert out["retention_accuracy_fair"] == pytest.approx((0.01 + 0.5) / 2)
    assert out["tasks"]["uppercase"]["accuracy_fair"] == 0.01
    assert (out["perplexity"], out["perplexity_data"], seen) == (7.0, "text:general", ["text:general"])  # default
    assert (out["params"], out["tokens_per_s"], out["size_mb"]) == (17, 16.0, 0.0)  # 2 tokens x 4 rows / 0.5 s
    print_stage_table([{"name": "sft", "source": "trained", "eval": out}])
    table = capsys.readouterr().out
    assert "fair acc" in table and "retention fair" in table and "62.5%" in table and "25.5%" in table


def test_eval_result_json_has_the_fair_marks(monkeypatch, tmp_path, tiny_model_dir):
    from posttrain.config import EvalConfig, build_config
    from posttrain.eval import harness

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": a}) + "\n" for i, a in enumerate(["5", "DOG"])))
    replies = [["2 + 3 = 5"], ["it is dog"]]
    monkeypatch.setattr(harness, "generate_texts", lambda *a, **kw: Generations(replies, 0))
    values = {"model": str(tiny_model_dir), "data": str(data), "out": str(tmp_path / "r.json"), "show_examples": 1}
    harness.evaluate(build_config(EvalConfig, values, path="eval"))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert (saved["accuracy_strict"], saved["accuracy_lenient"], saved["accuracy_fair"]) == (0.0, 1.0, 0.5)
    [example] = saved["examples"]
    assert (example["completion"], example["strict"], example["lenient"], example["fair"]) == (
        "2 + 3 = 5",
        False,
        True,
        True,
    )
