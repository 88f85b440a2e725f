"""Inference-time search: selection rules, beam == exhaustive search, tree budget and cache reuse, determinism,
compute accounting and the eval integration."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.rewards.builtin import arithmetic_steps
from posttrain.search import SearchSpec, best_index, extract_answer, majority_vote, search, weighted_vote
from posttrain.search.beam import _beam_one, normalised
from posttrain.tasks.arithmetic import column_addition


@pytest.fixture(scope="module")
def base():
    from posttrain.models.loading import load_model

    return load_model("builtin:tiny-base")


def rows_of(*questions):
    return [{"prompt": [{"role": "user", "content": q}], "answer": "x"} for q in questions]


# ---------------------------------------------------------------------------------------------- selection rules


def test_majority_vote_counts_answers_ignores_none_and_breaks_ties_by_first_seen():
    assert majority_vote(["3", "5", "5", "3", None]) == ("3", 2.0)  # tie 2-2: "3" was seen first
    assert majority_vote(["5", "3", "5", "3"]) == ("5", 2.0)
    assert majority_vote([None, "7", "8", "8"]) == ("8", 2.0)
    assert majority_vote([None, None]) == (None, 0.0)


def test_weighted_vote_sums_weights_per_answer():
    # "3": 0.2 + 0.3 = 0.5 beats "5": 0.45 even though "5" has the single largest weight.
    assert weighted_vote(["3", "5", "3"], [0.2, 0.45, 0.3]) == ("3", 0.5)
    assert weighted_vote(["5", "3"], [0.5, 0.5]) == ("5", 0.5)  # tie: first seen
    with pytest.raises(ValueError, match="2 answers but 1 weights"):
        weighted_vote(["1", "2"], [1.0])
    with pytest.raises(ValueError, match="finite"):
        weighted_vote(["1"], [math.nan])


def test_best_index_takes_the_first_of_equal_scores_and_never_nan():
    assert best_index([0.1, 0.7, 0.7]) == 1
    assert best_index([math.nan, 0.2, math.nan]) == 1
    assert best_index([-3.0]) == 0
    with pytest.raises(ValueError):
        best_index([])


def test_extract_answer():
    assert extract_answer("47+285\n...\nAnswer: 332") == "332"
    assert extract_answer("answer = Paris") == "Paris"
    assert extract_answer("so 3, then 14") == "14"
    assert extract_answer("no idea") == "idea"  # no answer line, no number: the last word
    assert extract_answer("so 12\nAnswer:") is None  # an empty answer line is no answer


def test_arithmetic_step_verifier_judges_each_line_without_the_gold():
    question = "Ann has 47 shells and finds 285 more. How many shells does Ann have now?"
    assert arithmetic_steps(column_addition(47, 285), question=question) == 1.0
    wrong_column = column_addition(47, 285).replace("4+8+1=13", "4+8+1=14")
    assert arithmetic_steps(wrong_column, question=question) < 1.0
    assert arithmetic_steps("Answer: 332", question=question) == 0.0  # terse: nothing to verify, not credited
    assert arithmetic_steps("47+285\n", question=question) == 1.0  # a correct partial solution


# ------------------------------------------------------------------------------------------------------ beam


def tiny_vocab_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper, more varied distributions than the default init
        model.lm_head.weight.mul_(40)
    return model


def sequence_logp(model, prompt, tokens):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0]
    logps = torch.log_softmax(logits.float(), -1)
    return sum(float(logps[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens))


@pytest.mark.parametrize("penalty", [0.0, 1.0])
def test_beam_search_equals_exhaustive_search_on_a_tiny_vocabulary(penalty):
    model, prompt, eos, steps = tiny_vocab_model(), [1, 3, 0], 2, 4
    # Every possible completion: ends at the first EOS, or is cut after `steps` tokens.
    every = set()
    for seq in itertools.product(range(4), repeat=steps):
        cut = list(seq[: seq.index(eos) + 1]) if eos in seq else list(seq)
        every.add(tuple(cut))
    exhaustive = sorted(
        ((normalised(sequence_logp(model, prompt, list(s)), len(s), penalty), s) for s in every), reverse=True
    )
    spec = SearchSpec(strategy="beam", n=len(every), max_new_tokens=steps, length_penalty=penalty)
    with torch.no_grad():
        hyps, _, _ = _beam_one(model, prompt, spec, eos)
    found = sorted(((normalised(lp, len(t), penalty), tuple(t)) for t, lp in hyps), reverse=True)
    assert {s for _, s in found} == every
    assert found[0][1] == exhaustive[0][1]
    for (a, _), (b, _) in zip(found, exhaustive):
        assert a == pytest.approx(b, abs=1e-4)


def test_beam_of_width_one_is_greedy(base):
    model, tok = base
    rows = rows_of("What is 12 + 345?", "Write in capitals: kettle")
    greedy = search(model, tok, rows, SearchSpec(strategy="greedy", max_new_tokens=20))
    beam = search(model, tok, rows, SearchSpec(strategy="beam", n=1, max_new_tokens=20))
    assert [r.completion for r in beam] == [r.completion for r in greedy]


# ------------------------------------------------------------------------------------------------------ tree


def test_tree_search_never_exceeds_its_budget_and_never_recomputes_a_prefix(base):
    model, tok = base
    rows = rows_of("What is 12 + 345?", "Ann has 47 shells and finds 285 more. How many shells does Ann have now?")
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        for budget in (7, 30, 90):
            spec = SearchSpec(strategy="tree", n=3, keep=2, max_new_tokens=40, token_budget=budget, temperature=1.0)
            results = search(model, tok, rows, spec)
            assert all(r.tokens <= budget for r in results), [r.tokens for r in results]
        unlimited = search(model, tok, rows, SearchSpec(strategy="tree", n=3, keep=2, max_new_tokens=40))
    finally:
        handle.remove()
    assert max(r.tokens for r in unlimited) > 90  # the budgets above did bind
    # One prefill per question; every other call feeds one new token per row: parents' caches are reused.
    assert sorted(calls, reverse=True)[: 2 * 4] == sorted([c for c in calls if c > 1], reverse=True)[: 2 * 4]
    assert sum(c > 1 for c in calls) == 2 * 4  # 4 searches x 2 questions, one prefill each


def test_tree_search_with_a_verifier_prunes_wrong_steps_and_prefers_verified_answers(base):
    model, tok = base
    row = {"prompt": [{"role": "user", "content": "What is 47 + 285?"}], "question": "What is 47 + 285?"}
    spec = SearchSpec(strategy="tree", n=3, keep=2, max_new_tokens=60, scorer=("arithmetic_steps",))
    result = search(model, tok, [row], spec)[0]
    # The chosen answer is the best-valued one in the pool, and its value is the verifier's own score.
    assert arithmetic_steps(result.completion, question=row["question"]) == max(result.scores)
    assert result.completion in result.candidates and result.forward_passes > 1


# ------------------------------------------------------------------------------------------ sampled strategies


@pytest.mark.parametrize(
    "spec",
    [
        SearchSpec(strategy="sample", n=3, max_new_tokens=16),
        SearchSpec(strategy="best_of_n", n=4, max_new_tokens=16),
        SearchSpec(strategy="self_consistency", n=4, max_new_tokens=16, weighted=True),
        SearchSpec(strategy="tree", n=2, keep=2, max_new_tokens=16),
    ],
    ids=lambda s: s.strategy,
)
def test_same_seed_same_outputs(base, spec):
    model, tok = base
    rows = rows_of("What is 12 + 345?", "Ann has 7 pens.")
    a, b = search(model, tok, rows, spec), search(model, tok, rows, spec)
    assert [(r.completion, r.candidates) for r in a] == [(r.completion, r.candidates) for r in b]


def test_best_of_n_picks_the_top_score_and_self_consistency_the_majority(base):
    model, tok = base
    rows = rows_of("What is 12 + 345?", "Ann has 7 pens.", "What is 99 + 1?")
    bon = search(model, tok, rows, SearchSpec(strategy="best_of_n", n=6, max_new_tokens=24, temperature=1.3))
    for r in bon:
        assert len(r.candidates) == 6 and r.completion == r.candidates[best_index(r.scores)]
        assert r.tokens >= sum(len(c) for c in r.candidates)  # character tokenizer: >= 1 token per character
    sc = search(model, tok, rows, SearchSpec(strategy="self_consistency", n=6, max_new_tokens=24, temperature=1.3))
    for r in sc:
        winner, _ = majority_vote([extract_answer(c) for c in r.candidates])
        assert r.answer == winner


def test_specs_that_cannot_work_are_refused(base):
    model, tok = base
    with pytest.raises(ConfigError, match="search.scorer: 'correct' compares with the gold answer"):
        search(model, tok, rows_of("hi"), SearchSpec(strategy="best_of_n", n=2, scorer=("correct",)))
    with pytest.raises(ConfigError, match="search.n"):
        search(model, tok, rows_of("hi"), SearchSpec(strategy="greedy", n=4))
    with pytest.raises(ConfigError, match="helper_model"):
        search(model, tok, rows_of("hi"), SearchSpec(strategy="hybrid", n=2))


def test_hybrid_main_model_scores_helper_proposals(base):
    model, tok = base
    rows = rows_of("Write in capitals: dog")
    result = search(model, tok, rows, SearchSpec(strategy="hybrid", n=3, max_new_tokens=8), helper=(model, tok))[0]
    # Helper == main model here, so the main model's teacher-forced mean log-probs equal the sampling ones.
    assert len(result.scores) == 3 and result.completion == result.candidates[best_index(result.scores)]


def test_eval_scaling_curve_reports_accuracy_compute_and_oracle_apart(tmp_path):
    from posttrain.config import EvalConfig, build_config
    from posttrain.eval.harness import evaluate

    cfg = build_config(
        EvalConfig,
        {"task": "uppercase", "limit": 6, "strategy": "best_of_n", "scaling": [1, 4], "max_new_tokens": 16},
        path="eval",
    )
    result = evaluate(cfg)
    points = result["scaling"]
    assert not list(tmp_path.iterdir())  # no out: nothing written
    assert [p["n"] for p in points] == [1, 4]
    for p in points:
        assert 0 <= p["accuracy"] <= p["oracle_pass_at_n"] <= 1
        assert p["tokens_per_question"] > 0 and p["forward_passes_per_question"] >= 1
    assert points[1]["tokens_per_question"] > 3 * points[0]["tokens_per_question"]
    assert result["accuracy"] == points[-1]["accuracy"] and "tokens_per_question" in result

    out = tmp_path / "r.json"
    from dataclasses import replace

    evaluate(replace(cfg, out=str(out)))
    saved = json.loads(out.read_text())["scaling"]  # same seed: the same answers, so the same accuracies
    assert [(p["n"], p["accuracy"]) for p in saved] == [(p["n"], p["accuracy"]) for p in points]
    assert "data:image/png;base64," in (tmp_path / "r.html").read_text()
