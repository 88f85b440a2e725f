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
