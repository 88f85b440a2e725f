"""Built-in reward functions. Model output is only ever matched as text, never evaluated as code."""

from __future__ import annotations

import re
from typing import Any

from posttrain.rewards.verify import generic_score

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


def _question(prompt: Any, question: Any) -> str:
    if isinstance(question, str):
        return question
    if isinstance(prompt, list):  # chat messages: the last user turn
        return next((m.get("content", "") for m in reversed(prompt) if m.get("role") == "user"), "")
    return str(prompt or "")


def arithmetic_steps(completion: str, *, prompt: Any = None, question: Any = None, **_: Any) -> float:
    """Process verifier for the arithmetic task: the share of the solution's lines that are consistent with
    the question and the lines before them (1.0 = every step checks out). Never looks at the gold answer, so
    search may use it; see ``posttrain.tasks.arithmetic.step_checks``."""
    from posttrain.tasks.arithmetic import step_checks

    checks = step_checks(_question(prompt, question), completion)
    return sum(checks) / len(checks) if checks else 1.0


BUILTIN_REWARDS = {
    "correct": correct,
    "correct_lenient": correct_lenient,
    "format": format_reward,
    "length_penalty": length_penalty,
    "arithmetic_steps": arithmetic_steps,
}
# Built-ins that compare against the gold answer: search never uses them as scorers (oracle only).
NEEDS_GOLD = {"correct", "correct_lenient"}
