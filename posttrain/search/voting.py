"""The selection rules of the search strategies: majority vote, score-weighted vote and best-of-N, over the final
answers of ``extract_answer`` (the one extractor of ``posttrain.rewards.verify``, re-exported here). Pure
functions; every tie is broken the same way: the candidate (or answer) that came first wins.

    >>> majority_vote([extract_answer(c) for c in ["Answer: 12", "so 7", "12", "hm\\nAnswer:", "7."]])
    ('12', 2.0)
    >>> weighted_vote(["12", "7", "12"], [0.1, 0.9, 0.3])
    ('7', 0.9)
    >>> best_index([0.2, 0.9, 0.9])
    1
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from posttrain.rewards.verify import extract_answer

__all__ = ["best_index", "extract_answer", "majority_vote", "weighted_vote"]


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> tuple[str | None, float]:
    """The answer with the largest total weight (None answers do not vote) and that total; ties go to the
    answer seen first. With no answer at all: (None, 0.0)."""
    if len(answers) != len(weights):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    totals: dict[str, float] = {}
    for answer, weight in zip(answers, weights):
        if answer is not None:
            if not math.isfinite(weight):
                raise ValueError(f"vote weight must be finite, got {weight}")
            totals[answer] = totals.get(answer, 0.0) + weight
    if not totals:
        return None, 0.0
    best = max(totals.values())
    winner = next(a for a in totals if totals[a] == best)  # dicts keep first-seen order
    return winner, best


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, float]:
    """The most frequent answer (None answers do not vote) and its count; ties go to the answer seen first."""
    return weighted_vote(answers, [1.0] * len(answers))


def best_index(scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the earliest candidate; NaN never wins."""
    if not scores:
        raise ValueError("no candidates to choose from")
    best, index = -math.inf, 0
    for i, score in enumerate(scores):
        if score > best:  # strict: the first of equal scores stays
            best, index = score, i
    return index
