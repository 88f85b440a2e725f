"""Shipped plain-text sets for perplexity, so a real model is measured on ordinary prose rather than on the
embedded default's corpus markup (``corpus:val`` holds addition worksheets and chat turns of the tiny model).

A set is one ASCII file ``posttrain/assets/text/NAME.txt`` of paragraphs separated by blank lines, written for
posttrain (``general``: 63 short factual paragraphs on everyday topics); each paragraph is one row
``{"text": ...}``. Its two splits alternate paragraphs, so both cover every topic: even-numbered paragraphs
(0, 2, ...) are ``test``, odd-numbered ones ``val``. A spec reads ``text:NAME[:SPLIT]``, split ``test`` by
default; ``perplexity_data: "text:general"`` measures perplexity on it.

    >>> test, val = text_rows("text:general"), text_rows("text:general:val")
    >>> len(test), len(val), sorted(test[0]), test[0]["text"].split(".")[0]
    (32, 31, ['text'], 'Water moves in a constant cycle')
"""

from __future__ import annotations

from pathlib import Path

from posttrain.errors import ConfigError

TEXT_DIR = Path(__file__).resolve().parent.parent / "assets" / "text"
SPLITS = ("test", "val")


def text_names() -> list[str]:
    """The names of the shipped text sets.

    >>> "general" in text_names()
    True
    """
    return sorted(p.stem for p in TEXT_DIR.glob("*.txt"))


def is_text_source(spec: str) -> bool:
    """Whether a data spec names a shipped text set (``text:NAME[:SPLIT]``).

    >>> is_text_source("text:general"), is_text_source("corpus:val"), is_text_source("text.jsonl")
    (True, False, False)
    """
    return spec.startswith("text:")


def text_rows(spec: str) -> list[dict[str, str]]:
    """Rows ``{"text"}`` of a shipped text set's split (``text:NAME[:SPLIT]``), identical on every call; an unknown
    name or split is a ``ConfigError`` that lists the valid ones.

    >>> text_rows("text:general:train")
    Traceback (most recent call last):
    ...
    posttrain.errors.ConfigError: text:general:train: no split 'train' (splits: test, val)
    """
    if not is_text_source(spec):
        raise ConfigError(f"{spec}: not a text set (expected text:NAME[:SPLIT])")
    name, _, split = spec[len("text:") :].partition(":")
    split = split or "test"
    if name not in text_names():
        raise ConfigError(f"{spec}: no shipped text set {name!r} (text sets: {', '.join(text_names())})")
    if split not in SPLITS:
        raise ConfigError(f"{spec}: no split {split!r} (splits: {', '.join(SPLITS)})")
    text = (TEXT_DIR / f"{name}.txt").read_text(encoding="utf-8")
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    return [{"text": p} for i, p in enumerate(paragraphs) if i % 2 == SPLITS.index(split)]
