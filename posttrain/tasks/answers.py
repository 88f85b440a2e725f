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
- The *fair* score (``fair_number``, ``fair_text``, ``fair_answer``; each task's ``fair``) is the one a real
  instruction-tuned model can earn without the toy's format, and that the wrong case or a wrong final value
  cannot earn; every strictly correct reply is fair-correct. A numeric gold: the final answer (``extract_answer``:
  the last answer line, else the last number) has the gold's value. That is exactly lenient for a numeric gold,
  so ``fair_number`` *is* lenient there (one rule, not two; "2 + 3 = 5" is right for 5). A text gold: the
  reply's *answer span* (the last answer line's value, else the reply's last non-empty line; spaces collapsed,
  the ends stripped of punctuation, quotes and markdown) ends with the gold as written, case included, starting
  at a word boundary: "Sure! Here it is:\\nHELLO WORLD" and "The word 'dog' in capitals is 'DOG'." are right for
  DOG; "dog", "it is dog" and "DOG\\nI hope this helps" are not. Lenient's case-insensitive credit for text is
  gone: echoing the lowercase input scores 0. Like the last number, only the end of one span counts, so a list
  of candidates earns nothing unless the right one comes last.

    >>> extract_answer("7+5+0=12 -> 2\\nAnswer: 332"), extract_answer("it is 41, no 42"), extract_answer("hm")
    ('332', '42', 'hm')
    >>> score_answer("so 3+4=7\\nAnswer: 7", "7"), score_answer("it is 7.", "7"), score_answer("Answer: 07", "7")
    ((True, True), (False, True), (False, True))
    >>> fair_answer("2 + 3 = 5", "5"), fair_answer("Sure! Here it is:\\nHELLO WORLD", "HELLO WORLD")
    (True, True)
    >>> reply = "The uppercase version is: plomk"
    >>> fair_answer(reply, "PLOMK"), score_answer(reply, "PLOMK")   # old lenient credit, no fair credit
    (False, (False, True))
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
# What may surround an answer span: punctuation and quotes (straight or curly), markdown emphasis, headers, quotes.
_SPAN_EDGES = _PUNCTUATION + "_~#>\u201c\u201d\u2018\u2019"


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


def _tail(text: str) -> str:
    """``text`` with runs of whitespace collapsed and its ends stripped of spaces, punctuation, quotes, markdown."""
    return " ".join(text.split()).strip(_SPAN_EDGES)


def answer_span(completion: str) -> str | None:
    """The span a text answer is read from: the last answer line's value, else the reply's last non-empty line,
    its ends stripped of punctuation, quotes and markdown; None for an empty reply or an empty answer line.

    >>> answer_span("Sure! Here it is:\\n**HELLO WORLD**\\n\\n"), answer_span("Answer: DOG\\nbye")
    ('HELLO WORLD', 'DOG')
    >>> answer_span("## _PLOMK_"), answer_span("Answer:"), answer_span(" \\n ")
    ('PLOMK', None, None)
    """
    values = _ANSWER_LINE.findall(completion)
    if values:
        span = values[-1]
    else:
        lines = [line for line in completion.splitlines() if line.strip()]
        span = lines[-1] if lines else ""
    return _tail(span) or None


def fair_number(completion: str, answer: str) -> bool:
    """Fair score for a numeric gold: the reply's final answer (the last answer line, else the last number) has
    the gold's value. This is the lenient half of ``score_answer`` for a numeric gold, reused, not restated;
    a gold that is not a number is never matched.

    >>> fair_number("2 + 3 = 5", "5"), fair_number("Answer: 1,200 coins", "1200"), fair_number("5, no 6", "5")
    (True, True, False)
    >>> fair_number("Answer: five", "5"), fair_number("five", "five")
    (False, False)
    """
    if _numeric_value(clean(answer)) is None:
        return False
    return score_answer(completion, answer)[1]


def fair_text(completion: str, answer: str) -> bool:
    """Fair score for a text gold: strict, or the reply's answer span (``answer_span``) ends with the gold as
    written, case included, starting at a word boundary.

    >>> fair_text("HELLO WORLD", "HELLO WORLD"), fair_text("Sure! Here it is:\\nHELLO WORLD", "HELLO WORLD")
    (True, True)
    >>> fair_text("The uppercase version is: hello world", "HELLO WORLD"), fair_text("HOTDOG", "DOG")
    (False, False)
    """
    if score_answer(completion, answer)[0]:
        return True
    gold, span = _tail(answer), answer_span(completion)
    return bool(gold) and span is not None and re.search(r"(?<!\w)" + re.escape(gold) + r"\Z", span) is not None


def fair_answer(completion: str, answer: str) -> bool:
    """The generic fair score (user data rows): ``fair_number`` for a numeric gold, else ``fair_text``.

    >>> fair_answer("so 47+285 = 332 shells", "332"), fair_answer("The capital is Paris.", "Paris")
    (True, True)
    >>> fair_answer("it is dog", "DOG"), fair_answer("the answer is 331", "332")
    (False, False)
    """
    if _numeric_value(clean(answer)) is not None:
        return fair_number(completion, answer)
    return fair_text(completion, answer)
