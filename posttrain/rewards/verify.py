"""The one verifier: answer extraction and (strict, lenient) scoring against a gold answer."""

from __future__ import annotations

import re

from posttrain.tasks.base import last_integer

_ANSWER_LINE = re.compile(r"(?:^|\n)\s*(?:Answer|answer|ANSWER)\s*[:=]\s*(.+?)\s*$")


def generic_score(completion: str, answer: str) -> tuple[bool, bool]:
    """Verifier for user data: strict = the reply ends with "Answer: <answer>" or is exactly the answer;
    lenient = the last number (for numeric answers) or the answer text appears anywhere.

    >>> generic_score("so 3+4=7\\nAnswer: 7", "7"), generic_score("it is 7.", "7")
    ((True, True), (False, True))
    """
    gold = answer.strip()
    text = completion.strip()
    match = _ANSWER_LINE.search(text)
    strict = text == gold or (match is not None and match.group(1).rstrip(".") == gold)
    if re.fullmatch(r"-?\d+", gold):
        lenient = last_integer(text) == gold
    else:
        lenient = re.search(r"(?<!\w)" + re.escape(gold.lower()) + r"(?!\w)", text.lower()) is not None
    return strict, lenient or strict
