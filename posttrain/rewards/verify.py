"""The one verifier: answer extraction and strict, lenient and fair scoring against a gold answer.

Every answer in the project is read here: the ``correct``/``correct_lenient`` rewards, the trainers' logged
accuracies, the evaluation harness (user data and built-in tasks alike, whose ``score`` delegates here) and the
votes of inference-time search. The functions are defined in ``posttrain.tasks.answers``, the lowest package
that needs them (the tasks score with them; rewards import tasks, never the reverse); the rules are listed there.

    >>> score_answer("so 3+4=7\\nAnswer: 7", "7"), score_answer("it is 7.", "7"), extract_answer("it is 7.")
    ((True, True), (False, True), '7')
"""

from __future__ import annotations

from posttrain.tasks.answers import (
    answer_span,
    clean,
    extract_answer,
    fair_answer,
    fair_number,
    fair_text,
    final_answer_line,
    last_number,
    same_answer,
    score_answer,
    strict_answer,
)

generic_score = score_answer  # the former name, kept for existing imports

__all__ = [
    "answer_span",
    "clean",
    "extract_answer",
    "fair_answer",
    "fair_number",
    "fair_text",
    "final_answer_line",
    "generic_score",
    "last_number",
    "same_answer",
    "score_answer",
    "strict_answer",
]
