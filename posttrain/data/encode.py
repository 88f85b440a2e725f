"""Rows to token ids plus a loss mask (True = the model is trained to predict this token).

Conversational rows are rendered with the tokenizer's chat template; the trained spans are found as character
ranges of the rendered text and mapped onto tokens through the tokenizer's offsets, so this works for any
fast tokenizer and any template whose rendering of a conversation's first turns is a prefix of the whole.

Given ``max_length``, text that cannot reach the first ``max_length`` tokens is cut before tokenising
(:func:`cap_row`), so a 50 MB line costs what a row of the model's length costs.

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
    capped: bool = False
    """Text was cut before tokenising (:func:`cap_row`): the row is longer than ``max_length``."""


@dataclass
class EncodeStats:
    """What the max-length policy did, reported in the run summary."""

    truncated: int = 0
    dropped: int = 0
    reasons: list[str] = field(default_factory=list)


# No token of the tokenizers we meet covers more characters than this on average over a text (single tokens
# can: a run of 64 spaces or "=" signs in some vocabularies), so the first max_length tokens of a text lie in
# its first max_length * MAX_CHARS_PER_TOKEN characters.
MAX_CHARS_PER_TOKEN = 32

# The fields a row is rendered from, in order: the first of these that the row has all of (the SFT formats of
# rows.FORMATS, then a prompt alone).
_RENDERINGS = (("messages",), ("prompt", "completion"), ("text",), ("prompt",))


def _rendered(row: Row) -> tuple[str, ...]:
    return next((keys for keys in _RENDERINGS if all(k in row for k in keys)), ())


def cap_row(row: Row, max_length: int) -> tuple[Row, bool]:
    """(``row`` cut to what its first ``max_length`` tokens can hold, whether anything was cut).

    The texts are taken in the order they are rendered (messages in turn; prompt, then completion) and cut once
    they total ``max_length * MAX_CHARS_PER_TOKEN`` characters, and a message list once it reaches
    ``max_length`` messages (each renders to at least one token). ``apply_length_policy`` keeps a sequence's
    first tokens, so the cut changes nothing that is kept; a row that was cut is longer than ``max_length``,
    which the returned flag says (``Example.capped``), so that length_policy="drop" still drops it.

        >>> cap_row({"prompt": "ab", "completion": "x" * 100}, 1)
        ({'prompt': 'ab', 'completion': 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'}, True)
    """
    left = max_length * MAX_CHARS_PER_TOKEN
    capped = False

    def cut(text: str) -> str:
        nonlocal left, capped
        if len(text) > left:
            text, capped = text[:left], True
        left -= len(text)
        return text

    out = dict(row)
    for key in _rendered(row):
        value = row[key]
        if isinstance(value, str):
            out[key] = cut(value)
        elif isinstance(value, list):
            if len(value) > max_length:
                value, capped = value[:max_length], True
            out[key] = [{**m, "content": cut(m["content"])} for m in value]
    return out, capped


def _render(tokenizer: Any, messages: list[dict], *, generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    if tokenizer.chat_template is None:
        raise DataError("tokenizer", None, "chat_template", "conversational rows need a tokenizer with a chat template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as err:
        raise DataError("chat template", None, None, f"the chat template refused the conversation ({err})") from None


def render_prompt(row: Row, tokenizer: Any, *, max_length: int | None = None) -> str:
    """The text a model is asked to continue for a prompt row (chat template applied to message lists). With
    ``max_length``, text past what ``max_length`` tokens can hold is cut first (:func:`cap_row`): enough to
    check the prompt's length, not to generate from."""
    prompt = cap_row(row, max_length)[0]["prompt"] if max_length is not None else row["prompt"]
    return prompt if isinstance(prompt, str) else _render(tokenizer, prompt, generation_prompt=True)


def _text_and_spans(row: Row, tokenizer: Any, completion_only: bool) -> tuple[str, list[tuple[int, int]], bool]:
    """(full text, trained character spans, whether the template already holds special tokens)."""
    eos = tokenizer.eos_token or ""
    rendered = _rendered(row)
    if rendered == ("messages",):
        messages = row["messages"]
        full = _render(tokenizer, messages, generation_prompt=False)
        if not completion_only:
            return full, [(0, len(full))], True
        return full, assistant_spans(tokenizer, messages, full), True
    if rendered == ("prompt", "completion"):
        if isinstance(row["prompt"], list):
            completion = row["completion"]
            if isinstance(completion, str):
                completion = [{"role": "assistant", "content": completion}]
            prompt_text = _render(tokenizer, row["prompt"], generation_prompt=True)
            messages = row["prompt"] + completion
            full = _render(tokenizer, messages, generation_prompt=False)
            if not full.startswith(prompt_text):
                raise DataError("chat template", None, "prompt", "rendered prompt is not a prefix of the conversation")
            if completion_only:  # each completion turn and its end-of-turn marker, as for messages rows
                first = len(row["prompt"])
                spans = assistant_spans(tokenizer, messages, full)
                turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
                return full, [span for i, span in zip(turns, spans) if i >= first], True
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


def assistant_spans(tokenizer: Any, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of ``full`` (the rendered conversation) that an SFT loss trains on: each assistant turn's
    text and its end-of-turn marker, not the role header before it nor the newline after it.

    A turn starts where the template's rendering of the conversation before it, with the generation prompt,
    ends (that prefix must begin ``full``: it is what the model sees when it writes the turn). It ends after the
    first end-of-turn marker from there, the marker being what the template writes after the turn's content when
    the turn is last. Searching for the marker, rather than taking the length of that rendering, keeps the span
    right for templates that rewrite earlier turns (e.g. drop their reasoning once a later user turn follows).

        >>> from posttrain.models.tiny import build_tokenizer
        >>> tok = build_tokenizer()
        >>> tok.chat_template = CHATML
        >>> msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        >>> full = tok.apply_chat_template(msgs, tokenize=False)
        >>> [full[a:b] for a, b in assistant_spans(tok, msgs, full)]
        ['yo<|im_end|>']
    """
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        if not full.startswith(prefix):
            raise DataError(
                "chat template",
                None,
                "messages",
                f"the rendering before assistant turn {i} is not a prefix of the"
                " whole conversation; the template cannot be trained on turn by turn",
            )
        alone = _render(tokenizer, messages[: i + 1], generation_prompt=False)[len(prefix) :]
        at = alone.rfind(m["content"]) if m["content"] else -1
        marker = alone[at + len(m["content"]) :].strip() if at >= 0 else ""
        start = len(prefix)
        found = full.find(marker, start) if marker else -1
        if found >= 0:
            end = found + len(marker)
        else:  # no marker (a template without end-of-turn text): the turn as rendered alone, trailing space cut
            end = start + len(alone.rstrip())
        spans.append((start, end))
    return spans


# SmolLM2-style ChatML, for doctests and tests (real tokenizers carry their own template).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def encode_row(row: Row, tokenizer: Any, *, completion_only: bool = True, max_length: int | None = None) -> Example:
    """Tokenise one validated SFT or text row (see module docstring); with ``max_length``, text that cannot
    reach the first ``max_length`` tokens is cut first (:func:`cap_row`)."""
    capped = False
    if max_length is not None:
        row, capped = cap_row(row, max_length)
    full, spans, templated = _text_and_spans(row, tokenizer, completion_only)
    enc = tokenizer(full, add_special_tokens=not templated, return_offsets_mapping=True)
    mask = []
    for start, end in enc["offset_mapping"]:
        # Special tokens added by the tokenizer (BOS) have an empty span and are never targets.
        mask.append(end > start and any(s <= start < e for s, e in spans))
    if completion_only and spans and not any(mask) and "messages" in row:
        raise DataError(
            "chat template",
            None,
            "messages",
            "no assistant token to train on after templating (the template may drop"
            " assistant turns); check the rendering with posttrain inspect",
        )
    return Example(list(enc["input_ids"]), mask, capped)


def apply_length_policy(example: Example, max_length: int, policy: str, stats: EncodeStats) -> Example | None:
    """Enforce ``max_length``: "truncate" keeps the first tokens, "drop" drops the row (a row whose text was cut
    before tokenising is too long, whatever its token count); a row with nothing left to train on is dropped
    either way. Counts go to ``stats``."""
    if len(example.input_ids) <= max_length and not example.capped:
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
