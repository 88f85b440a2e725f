"""Built-in reward functions. Model output is only ever matched as text, never evaluated as code."""

from __future__ import annotations

from typing import Any

from posttrain.rewards.verify import final_answer_line, score_answer


def correct(completion: str, *, answer: Any = None, **_: Any) -> float:
    """1.0 if the reply is strictly correct (its last line is "Answer: <answer>", or it is exactly the answer),
    else 0.0: the strict half of ``score_answer``.

    >>> correct("5+7=12\\nAnswer: 12", answer=12), correct("it is 12", answer="12")
    (1.0, 0.0)
    """
    return float(answer is not None and score_answer(completion, str(answer))[0])


def correct_lenient(completion: str, *, answer: Any = None, **_: Any) -> float:
    """1.0 if the reply's final answer (``extract_answer``) matches loosely, else 0.0: the lenient half of
    ``score_answer``.

    >>> correct_lenient("it is 12", answer="12"), correct_lenient("Answer: 12\\nAnswer: 13", answer="12")
    (1.0, 0.0)
    """
    return float(answer is not None and score_answer(completion, str(answer))[1])


def format_reward(completion: str, **_: Any) -> float:
    """1.0 if the reply's last line is an answer line with a value ("Answer: ..."), whatever the answer.

    >>> format_reward("5+7=12\\nAnswer: 12"), format_reward("12"), format_reward("Answer:")
    (1.0, 0.0, 0.0)
    """
    return float(final_answer_line(completion) is not None)


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
