"""Built-in reward functions. Model output is only ever matched as text, never evaluated as code."""

from __future__ import annotations

import re
from typing import Any

from posttrain.eval.harness import generic_score

_ANSWER_LINE = re.compile(r"(?:^|\n)Answer: \S.*\s*$")


def correct(completion: str, *, answer: Any = None, **_: Any) -> float:
    """1.0 if the reply ends with "Answer: <answer>" (or is exactly the answer), else 0.0 (strict match)."""
    return float(answer is not None and generic_score(completion, str(answer))[0])


def correct_lenient(completion: str, *, answer: Any = None, **_: Any) -> float:
    """1.0 if the final answer appears anywhere (the last number for numeric answers), else 0.0."""
    return float(answer is not None and generic_score(completion, str(answer))[1])


def format_reward(completion: str, **_: Any) -> float:
    """1.0 if the reply ends with an "Answer: ..." line, whatever the answer."""
    return float(_ANSWER_LINE.search(completion.strip()) is not None)


def length_penalty(completion: str, *, max_chars: int = 200, **_: Any) -> float:
    """-len(completion) / max_chars, capped at -1: a small push towards shorter replies."""
    return -min(len(completion) / max_chars, 1.0)


BUILTIN_REWARDS = {
    "correct": correct,
    "correct_lenient": correct_lenient,
    "format": format_reward,
    "length_penalty": length_penalty,
}
