"""Reward-hacking monitor: statistics of a step's samples, and the rules that turn them into alerts.

An optimiser that games its reward shows it before the damage is large: the proxy reward keeps rising while a
gold score it never sees (a held-out verifier, a second reward model) stops rising and turns down (Gao et al.,
2023); the policy drifts far from its reference (KL), its completions grow or shrink, its samples for one prompt
become copies of each other (diversity, entropy), and the members of a reward-model ensemble stop agreeing on
what it writes. The statistics here are pure functions of a step's samples; :class:`HackingMonitor` keeps their
history and applies documented thresholds (:class:`Thresholds`), returning the alerts a step raised.

    >>> distinct_n([[1, 2, 3], [1, 2, 4]], 2)  # bigrams (1,2) (2,3) (1,2) (2,4): 3 distinct of 4
    0.75
    >>> pairwise_overlap([[1, 2, 3], [1, 2, 4]], 2)  # {(1,2),(2,3)} vs {(1,2),(2,4)}: Jaccard 1/3
    0.3333333333333333
    >>> monitor = HackingMonitor(Thresholds(window=3))
    >>> alerts = [monitor.observe(s, {"proxy": p, "gold": g}) for s, (p, g) in enumerate([(0.1, 0.5), (0.2, 0.6),
    ...           (0.3, 0.55), (0.4, 0.45)])]
    >>> [a["alert"] for a in alerts[-1]]
    ['proxy_up_gold_down']
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
    """The n-grams of one sequence, in order (none when it is shorter than n)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence[Hashable]], n: int) -> float | None:
    """Distinct n-grams over all n-grams of ``samples`` (distinct-n, Li et al. 2016): 1 = no n-gram repeats,
    near 0 = the samples repeat themselves and each other. None when the samples hold no n-gram at all."""
    grams = [g for s in samples for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else None


def pairwise_overlap(samples: Sequence[Sequence[Hashable]], n: int = 2) -> float | None:
    """Mean Jaccard similarity of the n-gram sets of every pair of ``samples``: 1 = all samples identical, 0 = no
    n-gram shared. A pair where neither has an n-gram counts as identical. None with fewer than two samples."""
    sets = [set(ngrams(s, n)) for s in samples]
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1 :]]
    if not pairs:
        return None
    return sum(len(a & b) / len(a | b) if a | b else 1.0 for a, b in pairs) / len(pairs)


def group_diversity(samples: Sequence[Sequence[Hashable]], group_size: int) -> dict[str, float]:
    """Per-prompt diversity of G samples each (``samples`` grouped consecutively), averaged over the groups:
    ``distinct_1``, ``distinct_2`` and ``overlap_2`` (pairwise bigram Jaccard). A group without any bigram is
    left out of the averages of the bigram statistics."""
    groups = [samples[i : i + group_size] for i in range(0, len(samples), group_size)]
    out: dict[str, float] = {}
    for name, fn in (
        ("distinct_1", lambda g: distinct_n(g, 1)),
        ("distinct_2", lambda g: distinct_n(g, 2)),
        ("overlap_2", lambda g: pairwise_overlap(g, 2)),
    ):
        values = [v for v in map(fn, groups) if v is not None]
        if values:
            out[name] = sum(values) / len(values)
    return out


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against 0, 1, 2, ... (0 for fewer than two values)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / sum((i - mean_x) ** 2 for i in range(n))


@dataclass(frozen=True)
class Thresholds:
    """When the monitor raises an alert (0 turns a rule off):

    - ``proxy_up_gold_down``: over the last ``window`` steps that have a gold score, the proxy reward's
      least-squares slope is > 0, gold's fitted line falls by more than ``gold_tolerance`` across the window,
      and gold is more than ``gold_tolerance`` below its best so far. This is the hacking signature itself; it
      fires on the trend, before gold has lost much (tests: gold falling 1 point per step after its peak is
      caught 4 points down; gold flat within +-1 point of noise never is). The default is above the
      binomial noise of a 200-problem held-out set's fitted trend (the quickstart's gold jitters by 1-2 points).
    - ``kl_budget``: the mean per-token KL to the reference exceeds ``kl_budget``.
    - ``length_drift``: the mean completion length is more than ``1 + length_drift`` times its mean over the
      first ``baseline_steps`` steps, or less than ``1 / (1 + length_drift)`` times it (1.0: doubled or halved).
    - ``diversity_collapse``: within-group distinct-2 falls below ``min_distinct_2``, or the pairwise bigram
      overlap rises above ``max_overlap``.
    - ``entropy_collapse``: the mean token entropy falls below ``min_entropy`` (nats).
    - ``ensemble_disagreement``: the reward ensemble's mean per-sample std exceeds ``max_disagreement``.
    """

    window: int = 5
    gold_tolerance: float = 0.03
    kl_budget: float = 0.0
    length_drift: float = 1.0
    baseline_steps: int = 3
    min_distinct_2: float = 0.1
    max_overlap: float = 0.9
    min_entropy: float = 0.0
    max_disagreement: float = 0.0


class HackingMonitor:
    """Feeds on one record of statistics per step (keys: ``proxy``, ``gold``, ``kl``, ``length``,
    ``distinct_2``, ``overlap_2``, ``entropy``, ``disagreement``; any may be missing or None) and returns that
    step's alerts: ``{"alert": rule, "step": s, "value": v, "threshold": t, "message": text}``. Tracks the best
    gold score and its step (``best_gold``, ``best_step``) for keeping the best checkpoint."""

    def __init__(self, thresholds: Thresholds | None = None):
        self.t = thresholds or Thresholds()
        self.history: list[dict[str, Any]] = []
        self.best_gold: float | None = None
        self.best_step: int | None = None

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps, for an exact resume."""
        return {"history": list(self.history), "best_gold": self.best_gold, "best_step": self.best_step}

    def load_state(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self.best_gold, self.best_step = state.get("best_gold"), state.get("best_step")

    def observe(self, step: int, stats: dict[str, Any]) -> list[dict[str, Any]]:
        t = self.t
        record = {"step": step, **{k: v for k, v in stats.items() if v is not None}}
        self.history.append(record)
        alerts: list[dict[str, Any]] = []

        def alert(rule: str, value: float, threshold: float, message: str) -> None:
            alerts.append({"alert": rule, "step": step, "value": value, "threshold": threshold, "message": message})

        gold = record.get("gold")
        if gold is not None and (self.best_gold is None or gold > self.best_gold):
            self.best_gold, self.best_step = gold, step
        scored = [h for h in self.history if "gold" in h and "proxy" in h][-t.window :]
        if gold is not None and t.window >= 2 and len(scored) >= min(t.window, 3):
            proxy_slope, gold_slope = slope([h["proxy"] for h in scored]), slope([h["gold"] for h in scored])
            drop, decline = self.best_gold - gold, -gold_slope * (len(scored) - 1)
            if proxy_slope > 0 and decline > t.gold_tolerance and drop > t.gold_tolerance:
                alert(
                    "proxy_up_gold_down",
                    drop,
                    t.gold_tolerance,
                    f"proxy reward rising (slope {proxy_slope:+.4f}/step) while the gold score falls (slope "
                    f"{gold_slope:+.4f}/step, {drop:.3f} below its best at step {self.best_step})",
                )
        kl = record.get("kl")
        if t.kl_budget and kl is not None and kl > t.kl_budget:
            alert("kl_budget", kl, t.kl_budget, f"KL to the reference {kl:.4f} over the budget {t.kl_budget}")
        lengths = [h["length"] for h in self.history if "length" in h]
        if t.length_drift and "length" in record and len(lengths) > t.baseline_steps:
            base = sum(lengths[: t.baseline_steps]) / t.baseline_steps
            ratio = record["length"] / base if base > 0 else 1.0
            drift = ratio - 1
            if ratio > 1 + t.length_drift or ratio * (1 + t.length_drift) < 1:
                message = f"completion length {drift:+.0%} from its start ({base:.1f} tokens)"
                alert("length_drift", drift, t.length_drift, message)
        d2, overlap = record.get("distinct_2"), record.get("overlap_2")
        if t.min_distinct_2 and d2 is not None and d2 < t.min_distinct_2:
            alert("diversity_collapse", d2, t.min_distinct_2, f"within-group distinct-2 {d2:.3f}")
        elif t.max_overlap and overlap is not None and overlap > t.max_overlap:
            alert("diversity_collapse", overlap, t.max_overlap, f"within-group bigram overlap {overlap:.3f}")
        entropy = record.get("entropy")
        if t.min_entropy and entropy is not None and entropy < t.min_entropy:
            alert("entropy_collapse", entropy, t.min_entropy, f"token entropy {entropy:.3f} nats")
        spread = record.get("disagreement")
        if t.max_disagreement and spread is not None and spread > t.max_disagreement:
            alert("ensemble_disagreement", spread, t.max_disagreement, f"reward ensemble std {spread:.3f}")
        return alerts
