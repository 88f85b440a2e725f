"""The one answer extractor and scorer: rewards, the trainers' logged accuracies, evaluation, search votes and the
built-in tasks all read answers with these rules (public home: ``posttrain.rewards.verify``). They live here, at
the lowest package that needs them, because the tasks score with them and rewards already import tasks.

Rules:

- An *answer line* starts (after spaces) with "answer" or "final answer" in any case, then ":" or "="; its value
  is the rest of the line. Values and gold answers are *cleaned* alike: runs of spaces become one, surrounding
  spaces and trailing full stops go ("Answer: 12." gives "12").
- ``extract_answer``, the final answer (what a vote counts, what lenient scoring compares): the value of the
  last answer line, None if that value is empty ("Answer:" alone is no answer, even after numbers); without an
  answer line, the last number of the reply ("-5", "1,200", "3.5"; a minus right after a letter or digit is
  a subtraction: "12-5" gives "5"); without numbers, the last word; for an empty reply None.
- ``strict_answer``, the answer in the expected format: the value of the reply's last line when that is an
  answer line, or the whole reply when it is one line and no answer line (a bare answer: "DOG", "12"); else None.
- ``score_answer`` gives (strict, lenient). Strict: the strict answer equals the cleaned gold exactly (case,
  digits and separators as written). Lenient: strict, or the extracted answer matches the gold loosely: for a
  numeric gold the last number of the extracted answer has the same value ("012", "12.0", "1,200" match "12",
  "12", "1200"); else the same text ignoring case, spacing and surrounding punctuation ("dog" matches "DOG").
  A task whose reply is the answer itself (uppercase) needs no rule of its own: the bare answer is strict.

    >>> extract_answer("7+5+0=12 -> 2\\nAnswer: 332"), extract_answer("it is 41, no 42"), extract_answer("hm")
    ('332', '42', 'hm')
    >>> score_answer("so 3+4=7\\nAnswer: 7", "7"), score_answer("it is 7.", "7"), score_answer("Answer: 07", "7")
    ((True, True), (False, True), (False, True))
"""

from __future__ import annotations

import re
from decimal import Decimal

# "Answer: x", "answer = x", "Final answer: x" at the start of a line; group 1 is the rest of that line.
_ANSWER_LINE = re.compile(r"^[ \t]*(?:final[ \t]+)?answer[ \t]*[:=][ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)
# A number: optional sign (only where it cannot be a subtraction), thousands separators, decimals.
_NUMBER = r"(?:[-+](?=\d))?\d+(?:,\d{3})*(?:\.\d+)?"
_NUMBERS = re.compile(r"(?<![\w.])" + _NUMBER + r"(?!\d)")
_WORDS = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
_PUNCTUATION = " .,;:!?\"'`*()[]{}"


def clean(text: str) -> str:
    """``text`` with runs of whitespace collapsed and the ends stripped of spaces and full stops.

    >>> clean("  12.  "), clean("New   York.")
    ('12', 'New York')
    """
    return " ".join(text.split()).rstrip(".").strip()


def last_number(text: str) -> str | None:
    """The last number in ``text`` as written (sign, thousands separators, decimals), else None.

    >>> last_number("7+5=12 -> 2\\nso 632."), last_number("x = 3 - 8 = -5"), last_number("12-5"), last_number("no")
    ('632', '-5', '5', None)
    """
    found = _NUMBERS.findall(text)
    return found[-1] if found else None


def extract_answer(completion: str) -> str | None:
    """The final answer of a reply: the last answer line's value, else the last number, else the last word.

    >>> extract_answer("Answer: 12\\nAnswer: 13"), extract_answer("the answer is 12."), extract_answer("Answer:")
    ('13', '12', None)
    """
    lines = _ANSWER_LINE.findall(completion)
    if lines:
        return clean(lines[-1]) or None
    number = last_number(completion)
    if number is not None:
        return number
    words = _WORDS.findall(completion)
    return words[-1] if words else None


def final_answer_line(completion: str) -> str | None:
    """The value of the reply's last line if that is an answer line with a value, else None (the format check).

    >>> final_answer_line("5+7=12\\nAnswer: 12.\\n"), final_answer_line("12"), final_answer_line("Answer: 12\\nok")
    ('12', None, None)
    """
    match = _ANSWER_LINE.fullmatch(completion.strip().rsplit("\n", 1)[-1])
    return (clean(match.group(1)) or None) if match else None


def strict_answer(completion: str) -> str | None:
    """The answer if the reply is in the expected format: a last line "Answer: <x>", or a bare one-line reply.

    >>> strict_answer("5+7=12\\nAnswer: 12."), strict_answer("DOG\\n"), strict_answer("Answer: 12\\nmore")
    ('12', 'DOG', None)
    """
    text = completion.strip()
    if "\n" in text or _ANSWER_LINE.fullmatch(text):
        return final_answer_line(text)
    return clean(text) or None


def _numeric_value(text: str) -> Decimal | None:
    return Decimal(text.replace(",", "")) if re.fullmatch(_NUMBER, text) else None


def _loose(text: str) -> str:
    return " ".join(text.casefold().split()).strip(_PUNCTUATION)


def same_answer(extracted: str | None, answer: str) -> bool:
    """Whether an extracted answer matches the gold loosely: numbers by value (the last number of ``extracted``
    against a numeric gold), other text ignoring case, spacing and surrounding punctuation.

    >>> same_answer("012", "12"), same_answer("1,200 apples", "1200"), same_answer('"dog"', "DOG")
    (True, True, True)
    >>> same_answer("12 then 13", "12"), same_answer(None, "12")
    (False, False)
    """
    if extracted is None:
        return False
    gold = clean(answer)
    value = _numeric_value(gold)
    if value is not None:
        number = last_number(extracted)
        return number is not None and _numeric_value(number) == value
    return bool(_loose(gold)) and _loose(extracted) == _loose(gold)


def score_answer(completion: str, answer: str) -> tuple[bool, bool]:
    """(strict, lenient) correctness of a reply against the gold answer (rules in the module docstring).

    >>> score_answer("Answer: 12\\nAnswer: 13", "12"), score_answer("12", "12"), score_answer("it is dog", "DOG")
    ((False, False), (True, True), (False, True))
    """
    gold = clean(answer)
    strict = bool(gold) and strict_answer(completion) == gold
    return strict, strict or same_answer(extract_answer(completion), answer)
