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

Like real instruction data, the training rows mix two styles: a share of them (``direct_fraction``, 0.6 by
default) answer tersely with only the final line ("Answer: 332"), the rest work the sum out as above. The style
is fixed per question (a hash of its text), so the problems of every split are the same whatever the share. A
model fine-tuned on the mix imitates the majority style and answers tersely, which a 1 M-parameter model gets
right almost never; reinforcement learning with a verifiable reward then has a real behaviour to discover:
working the problem out pays. The quickstart's GRPO stage shows exactly that (completion length and accuracy
rise together). Evaluation never looks at the gold completion, only at the answer.
"""

from __future__ import annotations

import random
import re
import zlib

from posttrain.tasks.answers import fair_number
from posttrain.tasks.base import Task

NAMES = ["Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo"]
THINGS = ["shells", "coins", "apples", "books", "stamps", "cards", "pens", "eggs"]
TEMPLATES = [
    "{n} has {a} {t} and finds {b} more. How many {t} does {n} have now?",
    "{n} had {a} {t}. Then {n} got {b} more {t}. How many {t} in all?",
    "There are {a} {t} in one box and {b} in another. How many {t} in total?",
    "What is {a} + {b}?",
]


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
    """Addition word problems with 2- to 3-digit operands (configurable); a ``direct_fraction`` of the rows
    answer tersely, the rest carry column-wise solutions.

    >>> task = ArithmeticTask(direct_fraction=0.5)
    >>> styles = ["worked" if "+" in r["completion"][0]["content"] else "direct" for r in task.rows("test", 200)]
    >>> styles.count("direct")
    100
    """

    name = "arithmetic"
    description = "addition word problems; terse answers and step-by-step column solutions"
    version = 3

    def __init__(self, min_digits: int = 2, max_digits: int = 3, direct_fraction: float = 0.6):
        if not 0.0 <= direct_fraction <= 1.0:
            raise ValueError(f"direct_fraction must be in [0, 1], got {direct_fraction}")
        self.min_digits, self.max_digits, self.direct_fraction = min_digits, max_digits, direct_fraction

    def is_direct(self, question: str) -> bool:
        """Whether the row for ``question`` answers tersely: a stable hash of the text, not the row RNG, so the
        problems drawn do not depend on ``direct_fraction``."""
        return zlib.crc32(question.encode()) % 10_000 < self.direct_fraction * 10_000

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (digits - 1), 10**digits - 1)

    def example(self, rng: random.Random) -> tuple[str, str, str]:
        a, b = self._operand(rng), self._operand(rng)
        template = rng.choice(TEMPLATES)
        question = template.format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b)
        completion = f"Answer: {a + b}" if self.is_direct(question) else column_addition(a, b)
        return question, completion, str(a + b)

    def fair(self, completion: str, answer: str) -> bool:
        """Fair: the reply's final answer (answer line, else last number) has the sum's value (``fair_number``,
        which is the lenient rule for a number), whatever the working around it.

        >>> ArithmeticTask().fair("47 + 285 = 332", "332"), ArithmeticTask().fair("332, I mean 333", "332")
        (True, False)
        """
        return fair_number(completion, answer)


_OPERANDS = re.compile(r"^(\d+)\+(\d+)$")


def step_checks(question: str, completion: str) -> list[bool]:
    """Judge each line of a (partial) worked solution against the question and the lines before it, the way a
    process verifier would: line 1 copies the question's two numbers, line 2 pads them to one width, each column
    line adds the right digits and the previous carry and extends the partial sum, the last line restates it.
    A trailing empty line (a step just ended) is not judged. The gold answer is never consulted.

    >>> q = "What is 47 + 285?"
    >>> step_checks(q, column_addition(47, 285))
    [True, True, True, True, True, True]
    >>> step_checks(q, "47+255\\n047+255\\n")   # a copy slip in the first line; the second is consistent with it
    [False, True]
    >>> step_checks(q, "Answer: 332")
    [False]
    """
    numbers = re.findall(r"\d+", question)[:2]
    lines = completion.strip(" ").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    checks: list[bool] = []
    a = b = ""
    width, carry, partial = 0, 0, ""
    for i, line in enumerate(lines):
        if i == 0:
            match = _OPERANDS.match(line)
            a, b = match.groups() if match else ("", "")
            checks.append(bool(match) and [a, b] == numbers)
            width = max(len(a), len(b))
        elif i == 1:
            checks.append(bool(a) and line == f"{a.zfill(width)}+{b.zfill(width)}")
        elif i - 2 < width:
            column = i - 2
            x, y = int(a.zfill(width)[-1 - column]), int(b.zfill(width)[-1 - column])
            total = x + y + carry
            partial = (str(total) if column == width - 1 else str(total % 10)) + partial
            checks.append(line == f"{x}+{y}+{carry}={total} -> {partial}")
            carry = total // 10
        elif i - 2 == width:
            checks.append(line == f"Answer: {int(partial)}" if partial else False)
        else:
            checks.append(False)  # nothing follows the answer line
    return checks
