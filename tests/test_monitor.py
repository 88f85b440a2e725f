"""Reward-hacking monitor: each statistic against hand-computed values, and the alert rules on synthetic runs."""

from __future__ import annotations

import pytest

from posttrain.safeguards.monitor import (
    HackingMonitor,
    Thresholds,
    distinct_n,
    group_diversity,
    pairwise_overlap,
    slope,
)


def test_distinct_n_by_hand():
    samples = [[1, 2, 3], [1, 2, 4]]
    assert distinct_n(samples, 1) == pytest.approx(4 / 6)  # 1 2 3 1 2 4
    assert distinct_n(samples, 2) == pytest.approx(3 / 4)  # (1,2) (2,3) (1,2) (2,4)
    assert distinct_n(samples, 3) == 1.0  # (1,2,3) (1,2,4)
    assert distinct_n(samples, 4) is None and distinct_n([], 1) is None
    assert distinct_n([[7, 7, 7, 7]], 1) == pytest.approx(1 / 4)


def test_pairwise_overlap_by_hand():
    a, b = [1, 2, 3], [1, 2, 4]  # bigram sets {(1,2),(2,3)} and {(1,2),(2,4)}: Jaccard 1/3
    assert pairwise_overlap([a, b]) == pytest.approx(1 / 3)
    assert pairwise_overlap([a, b, list(a)]) == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert pairwise_overlap([a, b], n=1) == pytest.approx(2 / 4)  # {1,2,3} vs {1,2,4}
    assert pairwise_overlap([[1], [2]]) == 1.0  # neither has a bigram: identical as far as bigrams go
    assert pairwise_overlap([a]) is None


def test_group_diversity_averages_over_groups():
    samples = [[1, 2, 3], [1, 2, 4], [5, 5, 5], [5, 5, 5]]
    got = group_diversity(samples, 2)
    assert got["distinct_1"] == pytest.approx((4 / 6 + 1 / 6) / 2)
    assert got["distinct_2"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert got["overlap_2"] == pytest.approx((1 / 3 + 1) / 2)
    # groups are consecutive: the same samples grouped differently give other values
    assert group_diversity([samples[0], samples[2], samples[1], samples[3]], 2)["overlap_2"] == 0.0


def test_slope_by_hand():
    assert slope([1.0, 3.0, 5.0]) == pytest.approx(2.0)
    assert slope([2.0, 2.0, 2.0]) == 0.0 and slope([4.0]) == 0.0
    assert slope([0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.2)  # sum((x-1.5)(y-.5)) = 1 over sum((x-1.5)^2) = 5


def _run(monitor, proxies, golds):
    return [monitor.observe(s, {"proxy": p, "gold": g}) for s, (p, g) in enumerate(zip(proxies, golds))]


def test_hacking_alert_fires_on_proxy_up_gold_down_before_gold_loses_five_points():
    """The Gao et al. shape: proxy rises throughout; gold rises to step 10, then falls 1 point per step."""
    proxies = [0.02 * s for s in range(30)]
    golds = [0.4 + 0.02 * s if s <= 10 else 0.6 - 0.01 * (s - 10) for s in range(30)]
    monitor = HackingMonitor()
    fired = [s for s, alerts in enumerate(_run(monitor, proxies, golds)) if alerts]
    assert fired, "no alert"
    first = fired[0]
    assert all(a["alert"] == "proxy_up_gold_down" for s in fired for a in _run(HackingMonitor(), proxies, golds)[s])
    assert 0.6 - golds[first] < 0.05  # raised before gold had dropped by 5 points (here: 4, at step 14)
    assert first > 10 and monitor.best_step == 10 and monitor.best_gold == pytest.approx(0.6)


@pytest.mark.parametrize(
    "golds",
    [
        [0.4 + 0.01 * s for s in range(30)],  # both rise
        [0.4 + 0.01 * (s % 3) for s in range(30)],  # gold flat with noise
    ],
)
def test_no_hacking_alert_when_gold_keeps_up(golds):
    proxies = [0.02 * s for s in range(30)]
    assert not any(_run(HackingMonitor(), proxies, golds))


def test_no_hacking_alert_when_both_fall():
    proxies = [1.0 - 0.02 * s for s in range(20)]
    golds = [0.8 - 0.02 * s for s in range(20)]
    assert not any(_run(HackingMonitor(), proxies, golds))


def test_the_other_rules_at_their_thresholds():
    t = Thresholds(kl_budget=0.1, length_drift=0.5, baseline_steps=3, min_entropy=0.2, max_disagreement=0.3)
    monitor = HackingMonitor(t)
    for s in range(3):  # baseline length 10
        assert monitor.observe(s, {"length": 10.0, "kl": 0.05, "entropy": 1.0, "disagreement": 0.1}) == []
    assert monitor.observe(3, {"length": 14.0}) == []  # x1.4
    (alert,) = monitor.observe(4, {"length": 16.0})  # x1.6 > 1.5
    assert alert["alert"] == "length_drift" and alert["value"] == pytest.approx(0.6)
    assert monitor.observe(5, {"length": 7.0}) == []  # x0.7 > 1 / 1.5
    assert [a["alert"] for a in monitor.observe(5, {"length": 6.0})] == ["length_drift"]  # x0.6 < 1 / 1.5
    (alert,) = monitor.observe(6, {"kl": 0.2})
    assert (alert["alert"], alert["value"], alert["threshold"]) == ("kl_budget", 0.2, 0.1)
    assert [a["alert"] for a in monitor.observe(7, {"entropy": 0.1, "disagreement": 0.5})] == [
        "entropy_collapse",
        "ensemble_disagreement",
    ]
    assert [a["alert"] for a in monitor.observe(8, {"distinct_2": 0.05})] == ["diversity_collapse"]
    assert [a["alert"] for a in monitor.observe(9, {"distinct_2": 0.5, "overlap_2": 0.95})] == ["diversity_collapse"]
    assert monitor.observe(10, {"distinct_2": 0.5, "overlap_2": 0.5, "kl": 0.1}) == []  # at the budget: no alert
    off = HackingMonitor()  # defaults: no KL budget, entropy or disagreement rule
    assert off.observe(0, {"kl": 9.0, "entropy": 0.0, "disagreement": 9.0}) == []


def test_state_round_trip_resumes_exactly():
    proxies = [0.02 * s for s in range(30)]
    golds = [0.4 + 0.02 * s if s <= 10 else 0.6 - 0.01 * (s - 10) for s in range(30)]
    whole = _run(HackingMonitor(), proxies, golds)
    first = HackingMonitor()
    _run(first, proxies[:12], golds[:12])
    second = HackingMonitor()
    second.load_state(first.state())
    rest = [second.observe(s, {"proxy": proxies[s], "gold": golds[s]}) for s in range(12, 30)]
    assert rest == whole[12:] and second.best_step == 10


def test_sample_diversity_of_rollouts_uses_generated_tokens_per_group():
    from types import SimpleNamespace

    import torch

    from posttrain.distributed import DistContext
    from posttrain.train.rl import sample_diversity

    ids = torch.tensor([[1, 2, 3, 9], [1, 2, 4, 9], [5, 5, 5, 9], [5, 5, 5, 5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)  # 9s: padding
    ctx = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    got = sample_diversity(SimpleNamespace(completion_ids=ids, mask=mask), 2, ctx)
    assert got == pytest.approx(group_diversity([[1, 2, 3], [1, 2, 4], [5, 5, 5], [5, 5, 5]], 2))
    assert got["overlap_2"] == pytest.approx((1 / 3 + 1) / 2)


@pytest.mark.parametrize("on_hacking", ["warn", "stop"])
def test_grpo_alerts_are_logged_and_stop_keeps_final_and_best(tmp_path, on_hacking):
    """A threshold every sample crosses (within-group distinct-2 >= 0.99): each step's metrics line carries the
    alert; ``stop`` ends the run at step 1 with a checkpoint and final/; best/ holds the best held-out model."""
    import json

    from pinned import grpo_config
    from transformers import AutoModelForCausalLM

    from posttrain.train.grpo import run_grpo

    out = tmp_path / on_hacking
    summary = run_grpo(
        grpo_config(out, max_steps=2, eval_every=1, eval_limit=4, min_distinct_2=0.99, on_hacking=on_hacking)
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert all(0 <= r["distinct_2"] <= 1 and 0 <= r["overlap_2"] <= 1 for r in steps)
    assert all(a["alert"] == "diversity_collapse" and a["threshold"] == 0.99 for r in steps for a in r["alerts"])
    assert [r["step"] for r in steps] == ([1] if on_hacking == "stop" else [1, 2])
    assert summary["alerts"] == len(steps) and summary["steps"] == len(steps)
    assert summary["stopped_by_monitor"] == (1 if on_hacking == "stop" else None)
    assert (out / "final" / "model.safetensors").is_file()
    golds = {r["step"]: r["eval_accuracy_strict"] for r in rows if "eval_accuracy_strict" in r}
    assert summary["best_step"] == max(golds, key=lambda s: (golds[s], -s))  # the first step with the best gold
    assert summary["best"] and AutoModelForCausalLM.from_pretrained(out / "best") is not None


def test_search_budgets_watch_the_chosen_proxy_against_accuracy():
    """Along a scaling curve (n = 2, 4, 8, 16): the chosen candidates' proxy score rising while accuracy falls
    raises proxy_up_gold_down at the budget where the trend is clear; rising together raises nothing."""
    from types import SimpleNamespace

    from posttrain.eval.harness import budget_alerts, search_watch

    results = [
        SimpleNamespace(candidates=["a b c", "a b d"], scores=[0.2, 0.9], completion="a b d"),
        SimpleNamespace(candidates=["x y", "x y"], scores=[0.5, 0.1], completion="x y"),
    ]
    got = search_watch(results, "best_of_n")
    assert got["proxy_chosen"] == pytest.approx((0.9 + 0.5) / 2)  # "x y" is the first candidate: 0.5
    assert got["distinct_2"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert got["overlap_2"] == pytest.approx((1 / 3 + 1) / 2)
    assert "proxy_chosen" not in search_watch(results, "self_consistency")  # a vote, not a scorer, picks
    curve = [(2, 0.5, 0.70), (4, 0.6, 0.66), (8, 0.7, 0.60)]
    hacked = [{"n": n, "proxy_chosen": p, "accuracy": a} for n, p, a in curve]
    alerts = budget_alerts(hacked)
    assert [(a["alert"], a["n"]) for a in alerts] == [("proxy_up_gold_down", 8)]
    honest = [{**p, "accuracy": 0.6 + 0.05 * i} for i, p in enumerate(hacked)]
    assert budget_alerts(honest) == []


def test_grpo_monitor_resumes_exactly(tmp_path):
    """Killed after step 2 and resumed: the same alerts with the same values at every step as the uninterrupted
    run (the length rule's baseline needs steps 1-3, so a monitor that lost step 2 would differ from step 4)."""
    import json

    from pinned import grpo_config

    from posttrain.train.grpo import run_grpo

    options = dict(max_steps=5, save_every=1, length_drift=1e-4, min_distinct_2=0.0, max_overlap=0.0)
    run_grpo(grpo_config(tmp_path / "full", **options))
    run_grpo(grpo_config(tmp_path / "cut", **options), stop_after=2)
    run_grpo(grpo_config(tmp_path / "cut", resume=True, **options))
    lines = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("full", "cut")]
    alerts = [[(r["step"], r.get("alerts")) for r in map(json.loads, rows)] for rows in lines]
    assert alerts[0] == alerts[1]
    assert [step for step, a in alerts[0] if a] == [4, 5]  # the rule did fire after its 3-step baseline


def test_kl_budget_without_a_kl_penalty_is_refused_not_ignored():
    from posttrain.config import GRPOConfig, build_config
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="kl_budget"):
        build_config(GRPOConfig, {"out": "x", "kl_budget": 0.1}, path="grpo")
    assert build_config(GRPOConfig, {"out": "x", "kl_budget": 0.1, "kl_coef": 0.05}, path="grpo").kl_budget == 0.1
