"""Addition word problems solved column by column (the reasoning task of the embedded default).

The solution first restates the sum as digits (copied out of the words), then with both operands padded to
one width (so column i sits at a fixed place), then works from the units column up, so every carry is computed
before it is used; each line carries the partial result, so the final answer is a copy of the last partial:

    Q: Ann has 47 shells and finds 285 more. How many shells does Ann have now?
    A: 47+285
       047+285
       7+5+0=12 -> 2
       4+8+1=13 -> 32
       0+2+1=3 -> 332
       Answer: 332
"""

from __future__ import annotations

import random
import re

from posttrain.tasks.base import Task, last_integer

NAMES = ["Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo"]
THINGS = ["shells", "coins", "apples", "books", "stamps", "cards", "pens", "eggs"]
TEMPLATES = [
    "{n} has {a} {t} and finds {b} more. How many {t} does {n} have now?",
    "{n} had {a} {t}. Then {n} got {b} more {t}. How many {t} in all?",
    "There are {a} {t} in one box and {b} in another. How many {t} in total?",
    "What is {a} + {b}?",
]

_STRICT = re.compile(r"(?:^|\n)Answer: (-?\d+)\s*$")


def column_addition(a: int, b: int, *, final: str = "Answer: ") -> str:
    """The step-by-step solution of ``a + b`` (units column first), ending in ``<final><sum>``.

    >>> print(column_addition(47, 285))
    47+285
    047+285
    7+5+0=12 -> 2
    4+8+1=13 -> 32
    0+2+1=3 -> 332
    Answer: 332
    """
    da, db = str(a)[::-1], str(b)[::-1]
    width = max(len(da), len(db))
    lines, partial, carry = [f"{a}+{b}", f"{a:0{width}d}+{b:0{width}d}"], "", 0
    for i in range(width):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        # The last column writes its whole sum, so a final carry lands in the partial without an extra line.
        partial = (str(s) if i == width - 1 else str(s % 10)) + partial
        lines.append(f"{x}+{y}+{carry}={s} -> {partial}")
        carry = s // 10
    lines.append(f"{final}{a + b}")
    return "\n".join(lines)


class ArithmeticTask(Task):
    """Addition word problems with 2- to 3-digit operands (configurable) and column-wise solutions."""

    name = "arithmetic"
    description = "addition word problems, step-by-step column solutions"
    version = 2

    def __init__(self, min_digits: int = 2, max_digits: int = 3):
        self.min_digits, self.max_digits = min_digits, max_digits

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (digits - 1), 10**digits - 1)

    def example(self, rng: random.Random) -> tuple[str, str, str]:
        a, b = self._operand(rng), self._operand(rng)
        template = rng.choice(TEMPLATES)
        question = template.format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b)
        return question, column_addition(a, b), str(a + b)

    def strict_answer(self, completion: str) -> str | None:
        match = _STRICT.search(completion.strip())
        return match.group(1) if match else None

    def lenient_answer(self, completion: str) -> str | None:
        return last_integer(completion)
