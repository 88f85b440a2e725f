"""Uppercasing: the retention task of the embedded default (a skill unrelated to arithmetic).

Q: Write in capitals: plomk
A: PLOMK
"""

from __future__ import annotations

import random
import string

from posttrain.tasks.base import Task


class UppercaseTask(Task):
    """Write a random lowercase word of 3 to 8 letters in capitals; the answer is the whole reply."""

    name = "uppercase"
    description = "write a 3-8 letter word in capitals (retention task)"

    def example(self, rng: random.Random) -> tuple[str, str, str]:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        return f"Write in capitals: {word}", word.upper(), word.upper()

    def strict_answer(self, completion: str) -> str | None:
        return completion if completion.isalpha() and completion.isupper() else None

    def lenient_answer(self, completion: str) -> str | None:
        words = completion.split()
        return words[-1].strip(".").upper() if words else None
