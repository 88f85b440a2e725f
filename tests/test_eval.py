"""Evaluation: pass@k, verifiers, and the harness on a model with known behaviour."""

from __future__ import annotations

import json
from math import comb

import pytest

from posttrain.eval.generate import Generations
from posttrain.eval.metrics import ks_up_to, pass_at_k
from posttrain.rewards.verify import generic_score
from posttrain.tasks import get_task


def test_pass_at_k_hand_derived():
    assert pass_at_k(n=5, c=0, k=3) == 0.0
    assert pass_at_k(n=5, c=5, k=1) == 1.0
    assert pass_at_k(n=5, c=2, k=1) == pytest.approx(2 / 5)
    # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(n=5, c=2, k=2) == pytest.approx(0.7)
    assert pass_at_k(n=5, c=3, k=3) == 1.0  # fewer than k wrong samples: some draw of k must contain a right one
    assert pass_at_k(n=10, c=3, k=4) == pytest.approx(1 - comb(7, 4) / comb(10, 4))
    with pytest.raises(ValueError):
        pass_at_k(n=2, c=3, k=1)


def test_ks_up_to():
    assert ks_up_to(1) == [1]
    assert ks_up_to(8) == [1, 2, 4, 8]
    assert ks_up_to(6) == [1, 2, 4, 6]


def test_arithmetic_verifier_strict_and_lenient():
    task = get_task("arithmetic")
    assert task.score("047+285\n7+5+0=12 -> 2\nAnswer: 332", "332") == (True, True)
    assert task.score("the answer is 332", "332") == (False, True)  # right number, wrong format
    assert task.score("Answer: 333", "332") == (False, False)
    assert task.score("Answer: 332\nmore text 5", "332") == (False, True)  # the answer line, not the last line
    assert task.score("", "332") == (False, False)


def test_uppercase_verifier():
    task = get_task("uppercase")
    assert task.score("DOG", "DOG") == (True, True)
    assert task.score("it is dog", "DOG") == (False, True)
    assert task.score("DOGS", "DOG") == (False, False)


def test_generic_score():
    assert generic_score("Answer: Paris", "Paris") == (True, True)
    assert generic_score("I think Paris.", "Paris") == (False, True)
    assert generic_score("Parisian", "Paris") == (False, False)
    assert generic_score("12 then 13", "12") == (False, False)


def test_harness_accuracy_and_pass_at_k(monkeypatch, tmp_path, tiny_model_dir):
    from posttrain.config import EvalConfig, build_config
    from posttrain.eval import harness

    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(4)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Row i gets i right answers among 4 samples (the first i), formatted strictly.
    fake = [[f"Answer: {i}" if j < i else "Answer: x" for j in range(4)] for i in range(4)]

    def fake_generate(model, tokenizer, prompts, **kw):
        assert kw["n"] == 4 and kw["do_sample"]
        return Generations(fake, new_tokens=40)

    monkeypatch.setattr(harness, "generate_texts", fake_generate)
    cfg = build_config(
        EvalConfig,
        {
            "model": str(tiny_model_dir),
            "data": str(data),
            "strategy": "sample",
            "n": 4,
            "out": str(tmp_path / "r.json"),
        },
        path="eval",
    )
    result = harness.evaluate(cfg)
    # Mean over rows of (i/4): (0 + .25 + .5 + .75) / 4
    assert result["accuracy"] == pytest.approx(0.375)
    # pass@1 = accuracy; pass@4 = rows with any right = 3/4; pass@2 = mean(1 - C(4-c,2)/C(4,2))
    assert result["pass_at_k"]["1"] == pytest.approx(0.375)
    assert result["pass_at_k"]["4"] == pytest.approx(0.75)
    assert result["pass_at_k"]["2"] == pytest.approx((0 + 0.5 + 5 / 6 + 1) / 4)
    assert result["tokens_per_question"] == 10
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"] == pytest.approx(0.375)


def test_perplexity_of_uniform_model_is_vocab_size(tmp_path, tokenizer):
    import torch

    from posttrain.eval.harness import perplexity
    from posttrain.models.tiny import build_model

    model = build_model(tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # all logits 0 -> uniform over the vocabulary
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    assert perplexity(model, tokenizer, str(data)) == pytest.approx(len(tokenizer), rel=1e-4)


def test_arithmetic_style_mix_keeps_the_problems_and_answers_tersely():
    from posttrain.tasks.arithmetic import ArithmeticTask

    worked, mixed = ArithmeticTask(direct_fraction=0.0).rows("val"), ArithmeticTask().rows("val")
    assert [r["question"] for r in worked] == [r["question"] for r in mixed]
    direct = [r for r in mixed if "\n" not in r["completion"][0]["content"]]
    assert 0.5 < len(direct) / len(mixed) < 0.7
    assert all(r["completion"][0]["content"] == f"Answer: {r['answer']}" for r in direct)
    task = ArithmeticTask()
    assert all(task.score(r["completion"][0]["content"], r["answer"]) == (True, True) for r in mixed + worked)
    with pytest.raises(ValueError, match="direct_fraction"):
        ArithmeticTask(direct_fraction=1.5)


@pytest.mark.parametrize("show, kept", [(0, 0), (2, 2), (9, 4)])
def test_show_examples_keeps_that_many_with_their_marks(monkeypatch, tokenizer, show, kept):
    from posttrain.config import EvalConfig, build_config
    from posttrain.eval import harness

    rows = get_task("arithmetic").rows("test", 4)
    replies = [[f"Answer: {rows[0]['answer']}", "x"], ["so it is " + rows[1]["answer"], "x"], ["7", "x"], ["", "x"]]
    monkeypatch.setattr(harness, "generate_texts", lambda *a, **kw: Generations(replies, 0))
    values = {"task": "arithmetic", "limit": 4, "strategy": "sample", "n": 2, "show_examples": show}
    result = harness.evaluate_model(None, tokenizer, build_config(EvalConfig, values, path="eval"))
    # One example per row, its first sample; (strict, lenient, fair) by hand: right, right without format, wrong x2.
    marks = [(True, True, True), (False, True, True), (False, False, False), (False, False, False)]
    assert [(e["completion"], e["strict"], e["lenient"], e["fair"]) for e in result["examples"]] == [
        (r[0], *m) for r, m in zip(replies, marks)
    ][:kept]
    assert [e["answer"] for e in result["examples"]] == [r["answer"] for r in rows][:kept]
    assert (result["accuracy_strict"], result["accuracy_fair"]) == (1 / 8, 2 / 8)  # "x" is never right


def test_show_examples_must_not_be_negative():
    from posttrain.config import EvalConfig, build_config
    from posttrain.errors import ConfigError

    assert build_config(EvalConfig, {}, path="eval").show_examples == 5
    with pytest.raises(ConfigError, match=r"eval\.show_examples: must be >= 0, got -1"):
        build_config(EvalConfig, {"show_examples": -1}, path="eval")


def test_format_examples_prints_each_reply_with_its_marks():
    from posttrain.eval.harness import example_record, format_examples

    text = format_examples(
        [example_record("P1", "HELLO", "HELLO", (True, True, True)), example_record("P2", "hello", "HELLO", (0, 1, 0))]
    )
    assert text.splitlines() == [
        "--- example 1: strict yes, lenient yes, fair yes (gold answer: 'HELLO')",
        "prompt: 'P1'",
        "HELLO",
        "--- example 2: strict no, lenient yes, fair no (gold answer: 'HELLO')",
        "prompt: 'P2'",
        "hello",
    ]


def test_general_text_set_is_plain_prose_in_two_disjoint_splits():
    from posttrain.errors import ConfigError
    from posttrain.tasks.text import TEXT_DIR, text_rows

    test, val = text_rows("text:general"), text_rows("text:general:val")
    assert text_rows("text:general:test") == test
    paragraphs = [p for p in (TEXT_DIR / "general.txt").read_text().split("\n\n") if p.strip()]
    assert 40 <= len(paragraphs) <= 80 and (len(test), len(val)) == ((len(paragraphs) + 1) // 2, len(paragraphs) // 2)
    texts = [r["text"] for r in test + val]
    assert sorted(texts) == sorted(" ".join(p.split()) for p in paragraphs) and len(set(texts)) == len(texts)
    for text in texts:  # printable ASCII prose (the tiny model's characters), none of the toy's markup
        assert text.isascii() and text.isprintable() and 100 < len(text) < 500
        assert "<|" not in text and "</s>" not in text and "Answer:" not in text and "+" not in text
    with pytest.raises(ConfigError, match="no shipped text set 'nope'.*general"):
        text_rows("text:nope")
    with pytest.raises(ConfigError, match="no split 'train'"):
        text_rows("text:general:train")


def test_general_text_is_shipped_as_package_data():
    import fnmatch
    from pathlib import Path

    import posttrain
    from posttrain.tasks.text import TEXT_DIR

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(posttrain.__file__).parent
    pyproject = tomllib.loads((root.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["posttrain"]
    for path in TEXT_DIR.glob("*.txt"):
        assert any(fnmatch.fnmatch(path.relative_to(root).as_posix(), p) for p in patterns), (path, patterns)


def test_perplexity_of_uniform_model_on_general_text_is_vocab_size(tokenizer):
    import torch

    from posttrain.eval.harness import perplexity
    from posttrain.models.tiny import build_model

    model = build_model(tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # all logits 0 -> every token has probability 1/V, so perplexity is V
    assert perplexity(model, tokenizer, "text:general") == pytest.approx(len(tokenizer), rel=1e-4)


def test_suite_perplexity_source():
    from posttrain.errors import ConfigError
    from posttrain.pipeline import QUICKSTART, load_recipe, suite_configs, suite_perplexity_source

    assert suite_perplexity_source({"evaluate": {"tasks": ["arithmetic"]}}) == "text:general"  # the default
    assert suite_perplexity_source(load_recipe(QUICKSTART)) == "corpus:val"  # the tiny demo keeps its corpus
    assert suite_perplexity_source({"evaluate": {"perplexity_data": ""}}) == ""
    assert suite_perplexity_source({"evaluate": {"perplexity_data": None}}) == ""
    with pytest.raises(ConfigError, match="evaluate.perplexity_data: text:nope: no shipped text set"):
        suite_configs({"evaluate": {"tasks": ["arithmetic"], "perplexity_data": "text:nope"}})
