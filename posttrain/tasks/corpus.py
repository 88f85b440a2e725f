"""The generated pretraining corpus of the embedded default.

Documents mix what a tiny model needs before post-training: the one-digit addition table with carries (the
atoms of column addition), worked column additions as plain worksheets (no questions, no chat turns), sentences
in the style of the word problems followed by the numbers they mention (reading numbers out of text, but no
sums: reading a problem, solving it and answering in a conversation is what SFT teaches), and conversations
of the retention task rendered with the chat template, so the base model already knows the turn format and one
skill whose retention later stages are measured on.
"""

from __future__ import annotations

import random

from posttrain.tasks.arithmetic import NAMES, THINGS, column_addition
from posttrain.tasks.uppercase import UppercaseTask

SIZES = {"train": 20000, "val": 200}
VERSION = 2  # bump whenever generated rows change, so cached files are regenerated


def _facts_document(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(6, 10)):
        x, y, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 1)
        lines.append(f"{x}+{y}+{c}={x + y + c}")
    return "\n".join(lines)


def _worksheet_document(rng: random.Random) -> str:
    a, b = (rng.randint(1, 10 ** rng.randint(1, 4) - 1) for _ in range(2))
    return column_addition(a, b, final="= ")


def _story_document(rng: random.Random) -> str:
    sentences, numbers = [], []
    for _ in range(rng.randint(2, 4)):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        a = rng.randint(1, 10 ** rng.randint(1, 4) - 1)
        numbers.append(str(a))
        sentences.append(
            rng.choice([f"{name} has {a} {thing}.", f"There are {a} {thing} in a box.", f"{name} finds {a} more."])
        )
    return " ".join(sentences) + "\nNumbers: " + ", ".join(numbers)


def _dialogue_document(rng: random.Random, task: UppercaseTask) -> str:
    question, completion, _ = task.example(rng)
    return f"<|user|>{question}</s><|assistant|>{completion}</s>"


def corpus_rows(split: str = "train", n: int | None = None) -> list[dict[str, str]]:
    """Text rows ``{"text": ...}`` of the pretraining corpus, identical on every call.

    >>> rows = corpus_rows("val", 3)
    >>> [sorted(r) for r in rows]
    [['text'], ['text'], ['text']]
    """
    if split not in SIZES:
        raise ValueError(f"the corpus has no split {split!r}; splits: {sorted(SIZES)}")
    rng = random.Random(7 if split == "train" else 8)
    retention = UppercaseTask()
    held_out = {r["question"] for r in retention.rows("test")}
    rows = []
    while len(rows) < (SIZES[split] if n is None else n):
        kind = rng.random()
        if kind < 0.15:
            text = _facts_document(rng)
        elif kind < 0.45:
            text = _worksheet_document(rng)
        elif kind < 0.7:
            text = _story_document(rng)
        else:
            text = _dialogue_document(rng, retention)
            if text.split("</s>")[0].removeprefix("<|user|>") in held_out:
                continue
        rows.append({"text": text})
    return rows
