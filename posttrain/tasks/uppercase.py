"""Uppercasing: the retention task of the embedded default (a skill unrelated to arithmetic).

Q: Write in capitals: plomk
A: PLOMK
"""

from __future__ import annotations

import random
import string

from posttrain.tasks.base import Task


class UppercaseTask(Task):
    """Write a random lowercase word of 3 to 8 letters in capitals; the answer is the whole reply (a bare
    one-line reply is strict for the one scorer, so the task needs no rule of its own)."""

    name = "uppercase"
    description = "write a 3-8 letter word in capitals (retention task)"

    def example(self, rng: random.Random) -> tuple[str, str, str]:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        return f"Write in capitals: {word}", word.upper(), word.upper()
