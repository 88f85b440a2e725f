"""Generated preference pairs over the arithmetic problems (the embedded default's feedback data).

Each row is ``{"prompt", "chosen", "rejected", "answer"}`` (chat messages, TRL's column names). The chosen reply
is always the worked, correct column solution; the rejected one is, in equal shares (fixed per question by a
hash): a terse wrong answer, a worked solution with one copy slip in the first line (every later line
consistent with the slip, so the final answer is wrong), or a terse correct answer (right but sloppy: no
working). Splits are the arithmetic task's problems, so the test problems never occur in training.

    >>> row = ArithmeticPreferences().rows("test", 1)[0]
    >>> sorted(row)
    ['answer', 'chosen', 'prompt', 'question', 'rejected']
    >>> row["chosen"][0]["content"].endswith("Answer: " + row["answer"])
    True
"""

from __future__ import annotations

import random
import re
import zlib

from posttrain.tasks.arithmetic import ArithmeticTask, column_addition
from posttrain.tasks.base import Row

KINDS = ("terse_wrong", "copy_slip", "terse_right")


def _slip(number: int, rng: random.Random) -> int:
    """``number`` with one digit changed (never into a leading zero)."""
    digits = list(str(number))
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0")]
    digits[i] = rng.choice(choices)
    return int("".join(digits))


class ArithmeticPreferences(ArithmeticTask):
    """Preference pairs on the arithmetic problems; scored like the arithmetic task (its ``fair`` included: the
    final answer's value)."""

    name = "arithmetic_prefs"
    description = "preference pairs: worked correct solutions over wrong or sloppy ones"
    version = 1

    def __init__(self) -> None:
        super().__init__(direct_fraction=0.0)

    def kind(self, question: str) -> str:
        return KINDS[zlib.crc32(("pref/" + question).encode()) % len(KINDS)]

    def rows(self, split: str, n: int | None = None) -> list[Row]:
        out = []
        for row in super().rows(split, n):
            question = row["question"]
            a, b = (int(x) for x in re.findall(r"\d+", question)[:2])
            rng = random.Random(zlib.crc32(question.encode()))
            kind = self.kind(question)
            if kind == "terse_wrong":
                rejected = f"Answer: {_slip(a + b, rng)}"
            elif kind == "copy_slip":
                rejected = column_addition(_slip(a, rng), b)
            else:
                rejected = f"Answer: {a + b}"
            out.append(
                {
                    "prompt": row["prompt"],
                    "chosen": [{"role": "assistant", "content": column_addition(a, b)}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "answer": row["answer"],
                    "question": question,
                }
            )
        return out
