"""The task interface: a generated dataset with fixed splits plus a verifier.

Legend: a *row* is a dict in the data-row contract of DESIGN.md. SFT rows carry ``prompt`` and ``completion``
as chat messages; eval rows carry ``prompt`` and ``answer``.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import Any

from posttrain.tasks.answers import fair_answer, score_answer

Row = dict[str, Any]


class Task(ABC):
    """A generated task: deterministic splits, scored by the one verifier (``posttrain.tasks.answers``)."""

    name: str
    description: str
    version: int = 1  # bump whenever generated rows change, so cached files are regenerated
    sizes: dict[str, int] = {"train": 20000, "val": 200, "test": 500}
    # Earlier splits are drawn first and excluded from later ones: test, then val, then train.
    order = ("test", "val", "train")

    @abstractmethod
    def example(self, rng: random.Random) -> tuple[str, str, str]:
        """One problem drawn from ``rng``: (question, step-by-step completion, final answer)."""

    def split_seed(self, split: str) -> int:
        # Fixed per task and split: the same rows on every machine and every run.
        return sum(ord(c) * 131**i for i, c in enumerate(f"{self.name}/{split}")) % (2**31)

    def rows(self, split: str, n: int | None = None) -> list[Row]:
        """The split's rows, identical on every call. Test and val problems never occur in train.

        >>> from posttrain.tasks import get_task
        >>> row = get_task("arithmetic").rows("test", 1)[0]
        >>> sorted(row)
        ['answer', 'completion', 'prompt', 'question']
        """
        if split not in self.sizes:
            raise ValueError(f"task {self.name!r} has no split {split!r}; splits: {sorted(self.sizes)}")
        n = self.sizes[split] if n is None else n
        held_out = set()
        for earlier in self.order[: self.order.index(split)]:
            held_out |= {r["question"] for r in self.rows(earlier)}
        rng = random.Random(self.split_seed(split))
        out: list[Row] = []
        seen: set[str] = set()
        while len(out) < n:
            question, completion, answer = self.example(rng)
            if question in held_out or question in seen:
                continue
            seen.add(question)
            out.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "completion": [{"role": "assistant", "content": completion}],
                    "answer": answer,
                    "question": question,
                }
            )
        return out

    def score(self, completion: str, answer: str) -> tuple[bool, bool]:
        """(strict, lenient) correctness of one completion against the gold answer: ``score_answer``, the one
        scorer of rewards, evaluation and search. A task states what it expects through its gold answers and
        completions, never through rules of its own.

        >>> from posttrain.tasks import get_task
        >>> get_task("uppercase").score("PLOMK", "PLOMK"), get_task("uppercase").score("it is plomk", "PLOMK")
        ((True, True), (False, True))
        """
        return score_answer(completion, answer)

    def fair(self, completion: str, answer: str) -> bool:
        """The task's *fair* correctness of one completion: what a real instruction-tuned model can earn without
        the task's answer format (rules in ``posttrain.tasks.answers``). A task declares its rule by overriding
        this; the default, also the rule of user data rows, is ``fair_answer`` (by the gold: a number or text).

        >>> from posttrain.tasks import get_task
        >>> get_task("uppercase").fair("Here it is:\\nPLOMK", "PLOMK"), get_task("uppercase").fair("plomk", "PLOMK")
        (True, False)
        """
        return fair_answer(completion, answer)
