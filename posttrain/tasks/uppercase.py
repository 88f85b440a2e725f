"""Uppercasing: the retention task of the embedded default (a skill unrelated to arithmetic).

Q: Write in capitals: plomk
A: PLOMK
"""

from __future__ import annotations

import random
import string

from posttrain.tasks.answers import fair_text
from posttrain.tasks.base import Task


class UppercaseTask(Task):
    """Write a random lowercase word of 3 to 8 letters in capitals; the answer is the whole reply (a bare
    one-line reply is strict for the one scorer, so strict and lenient need no rule of their own; the fair score
    is the case-sensitive ``fair_text``)."""

    name = "uppercase"
    description = "write a 3-8 letter word in capitals (retention task)"

    def example(self, rng: random.Random) -> tuple[str, str, str]:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        return f"Write in capitals: {word}", word.upper(), word.upper()

    def fair(self, completion: str, answer: str) -> bool:
        """Fair: the reply's answer span ends with the capitals exactly (``fair_text``): a chatty "Here it is:
        PLOMK" counts; "plomk", "Plomk" and an echo of the question do not (case is the whole task).

        >>> task = UppercaseTask()
        >>> task.fair("Sure! In capitals:\\n**PLOMK**", "PLOMK"), task.fair("Write in capitals: plomk", "PLOMK")
        (True, False)
        """
        return fair_text(completion, answer)
