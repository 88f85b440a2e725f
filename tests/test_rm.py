"""Reward model: Bradley-Terry loss by hand, plain-transformers loading with equal rewards, held-out pair
accuracy, ensemble scoring (mean and disagreement) through the rewards API, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import RMConfig, build_config
from posttrain.losses.preference import bradley_terry_loss
from posttrain.rewards import parse_rewards, score_completions
from posttrain.rewards.model import RewardModelScorer
from posttrain.tasks import get_task
from posttrain.train.rm import run_rm


def test_bradley_terry_hand_derived_and_swap():
    chosen, rejected = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.5])
    loss = bradley_terry_loss(chosen, rejected)
    # -log sigma(1) = log(1 + e^-1) = 0.313262; -log sigma(0) = log 2
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log(2)])
    with_margin = bradley_terry_loss(chosen, rejected, torch.tensor([1.0, 0.0]))
    assert float(with_margin[0]) == pytest.approx(math.log(2))  # the margin eats the whole difference
    swapped = bradley_terry_loss(rejected, chosen)
    assert float(swapped[0] - loss[0]) == pytest.approx(1.0)  # softplus(x) - softplus(-x) = x


def cfg(tmp_path, out, **kw):
    rows = get_task("arithmetic_prefs").rows("val", 40)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows))
    values = {
        "model": "builtin:tiny-base",
        "data": str(data),
        "eval_data": str(data),
        "out": str(out),
        "max_steps": 12,
        "batch_size": 8,
        "lr": 2e-3,
        "log_every": 1,
        "progress": False,
        "seed": 0,
        "max_length": 256,
    }
    return build_config(RMConfig, {**values, **kw}, path="rm")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    summary = run_rm(cfg(tmp, tmp / "run"))
    return tmp, summary


def test_reward_model_learns_the_pairs_and_reports_held_out_accuracy(trained):
    tmp, summary = trained
    rows = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert summary["heldout"]["pair_accuracy"] > 0.8  # 40 pairs seen 2.4 times: it must at least fit them


def test_saved_reward_model_loads_with_plain_transformers_and_scores_the_same(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tmp, _ = trained
    final = str(tmp / "run" / "final")
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    scorer = RewardModelScorer([final])
    row = get_task("arithmetic_prefs").rows("test", 1)[0]
    ours, _ = scorer.score([row["prompt"]], [row["chosen"][0]["content"]])
    text = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    with torch.no_grad():
        theirs = hf(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]
    assert ours[0] == pytest.approx(float(theirs), abs=1e-4)


def test_ensemble_mean_and_disagreement_through_the_rewards_api(trained, tmp_path):
    tmp, _ = trained
    run_rm(cfg(tmp_path, tmp_path / "second", seed=1, max_steps=4))
    first, second = str(tmp / "run" / "final"), str(tmp_path / "second" / "final")
    rows = get_task("arithmetic_prefs").rows("test", 3)
    replies = [r["chosen"][0]["content"] for r in rows]
    a = RewardModelScorer([first]).score([r["prompt"] for r in rows], replies)[0]
    b = RewardModelScorer([second]).score([r["prompt"] for r in rows], replies)[0]
    mean, spread = RewardModelScorer([first, second]).score([r["prompt"] for r in rows], replies)
    assert mean == pytest.approx([(x + y) / 2 for x, y in zip(a, b)], abs=1e-5)
    assert spread == pytest.approx([abs(x - y) / 2 for x, y in zip(a, b)], abs=1e-5)
    specs = parse_rewards([f"rm:{first}+{second}"])
    scores = score_completions(specs, replies, [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    assert scores.total.tolist() == pytest.approx(mean, abs=1e-5)
    # the spread reaches the trainers (the reward-hacking monitor's ensemble disagreement), one per completion
    assert scores.disagreement.tolist() == pytest.approx(spread, abs=1e-5)
    single = score_completions(parse_rewards([f"rm:{first}"]), replies, [{"prompt": r["prompt"]} for r in rows])
    assert single.disagreement is None


def test_rm_resume_equals_uninterrupted(tmp_path):
    run_rm(cfg(tmp_path, tmp_path / "full", max_steps=4, save_every=1))
    run_rm(cfg(tmp_path, tmp_path / "cut", max_steps=4, save_every=1), stop_after=2)
    run_rm(cfg(tmp_path, tmp_path / "cut", max_steps=4, save_every=1, resume=True))
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reward_model_scores_search_candidates(trained):
    from posttrain.models.loading import load_model
    from posttrain.search import SearchSpec, search

    tmp, _ = trained
    final = str(tmp / "run" / "final")
    model, tok = load_model("builtin:tiny-base")
    rows = [{k: r[k] for k in ("prompt", "answer")} for r in get_task("arithmetic").rows("test", 2)]
    spec = SearchSpec(strategy="best_of_n", n=3, max_new_tokens=12, scorer=(f"rm:{final}",))
    results = search(model, tok, rows, spec)
    scorer = RewardModelScorer([final])
    for result, row in zip(results, rows):
        expected, _ = scorer.score([row["prompt"]] * 3, result.candidates)
        assert result.scores == pytest.approx(expected, abs=1e-5)
        assert result.completion == result.candidates[max(range(3), key=lambda i: (expected[i], -i))]
