"""Rows to token ids plus a loss mask (True = the model is trained to predict this token).

Conversational rows are rendered with the tokenizer's chat template; the trained spans are found as character
ranges of the rendered text and mapped onto tokens through the tokenizer's offsets, so this works for any
fast tokenizer and any template whose rendering of a conversation's first turns is a prefix of the whole.

    >>> from posttrain.models.tiny import build_tokenizer
    >>> tok = build_tokenizer()
    >>> ex = encode_row({"prompt": "1+1=", "completion": "2"}, tok)
    >>> tok.decode(ex.input_ids), ex.loss_mask
    ('1+1=2</s>', [False, False, False, False, True, True])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import DataError

Row = dict[str, Any]


@dataclass
class Example:
    """One tokenised sequence. ``loss_mask[t]`` says whether token t is a training target."""

    input_ids: list[int]
    loss_mask: list[bool]


@dataclass
class EncodeStats:
    """What the max-length policy did, reported in the run summary."""

    truncated: int = 0
    dropped: int = 0
    reasons: list[str] = field(default_factory=list)


def _render(tokenizer: Any, messages: list[dict], *, generation_prompt: bool) -> str:
    if tokenizer.chat_template is None:
        raise DataError("tokenizer", None, "chat_template", "conversational rows need a tokenizer with a chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_prompt(row: Row, tokenizer: Any) -> str:
    """The text a model is asked to continue for a prompt row (chat template applied to message lists)."""
    prompt = row["prompt"]
    return prompt if isinstance(prompt, str) else _render(tokenizer, prompt, generation_prompt=True)


def _text_and_spans(row: Row, tokenizer: Any, completion_only: bool) -> tuple[str, list[tuple[int, int]], bool]:
    """(full text, trained character spans, whether the template already holds special tokens)."""
    eos = tokenizer.eos_token or ""
    if "messages" in row:
        messages = row["messages"]
        full = _render(tokenizer, messages, generation_prompt=False)
        if not completion_only:
            return full, [(0, len(full))], True
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(_render(tokenizer, messages[:i], generation_prompt=True)) if i else 0
            end = len(_render(tokenizer, messages[: i + 1], generation_prompt=False))
            spans.append((start, end))
        return full, spans, True
    if "prompt" in row:
        if isinstance(row["prompt"], list):
            completion = row["completion"]
            if isinstance(completion, str):
                completion = [{"role": "assistant", "content": completion}]
            prompt_text = _render(tokenizer, row["prompt"], generation_prompt=True)
            full = _render(tokenizer, row["prompt"] + completion, generation_prompt=False)
            templated = True
        else:
            prompt_text = row["prompt"]
            full = prompt_text + row["completion"]
            full += "" if full.endswith(eos) else eos
            templated = False
        if not full.startswith(prompt_text):
            raise DataError("chat template", None, "prompt", "rendered prompt is not a prefix of the conversation")
        return full, [(len(prompt_text) if completion_only else 0, len(full))], templated
    text = row["text"]
    return text + ("" if text.endswith(eos) else eos), [(0, len(text) + len(eos))], False


def encode_row(row: Row, tokenizer: Any, *, completion_only: bool = True) -> Example:
    """Tokenise one validated SFT or text row (see module docstring)."""
    full, spans, templated = _text_and_spans(row, tokenizer, completion_only)
    enc = tokenizer(full, add_special_tokens=not templated, return_offsets_mapping=True)
    mask = []
    for start, end in enc["offset_mapping"]:
        # Special tokens added by the tokenizer (BOS) have an empty span and are never targets.
        mask.append(end > start and any(s <= start < e for s, e in spans))
    return Example(list(enc["input_ids"]), mask)


def apply_length_policy(example: Example, max_length: int, policy: str, stats: EncodeStats) -> Example | None:
    """Enforce ``max_length``: "truncate" keeps the first tokens, "drop" drops the row; a row with nothing left
    to train on is dropped either way. Counts go to ``stats``."""
    if len(example.input_ids) <= max_length:
        return example if any(example.loss_mask[1:]) else _drop(stats, "no trained tokens")
    if policy == "drop":
        return _drop(stats, f"longer than max_length={max_length}")
    cut = Example(example.input_ids[:max_length], example.loss_mask[:max_length])
    if not any(cut.loss_mask[1:]):
        return _drop(stats, f"prompt fills max_length={max_length}")
    stats.truncated += 1
    return cut


def _drop(stats: EncodeStats, reason: str) -> None:
    stats.dropped += 1
    if len(stats.reasons) < 20:
        stats.reasons.append(reason)
    return None
