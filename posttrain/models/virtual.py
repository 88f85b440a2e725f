"""Prompt and prefix tuning (``peft``'s prompt-learning adapters) on packed rows and in the rollout engine.

``peft`` adds virtual tokens inside its own ``forward``: prompt tuning puts V learned embeddings in front of
each *batch row*, prefix tuning puts V learned keys and values in front of every layer's cache. Packed rows hold
many sequences, and posttrain's decoding calls the model step by step with its own cache, so neither fits as is.
Here the same parameters (read from the peft model, so the adapter saves and loads as plain peft) are applied
*per sequence*:

- prompt tuning (and p-tuning): V embedding slots are inserted in front of each packed sequence (in front of each
  shared prompt, for groups); the real tokens' positions start at V, as in peft (which numbers positions over the
  virtual tokens too); the virtual slots' outputs are dropped.
- prefix tuning: every sequence's queries also attend to the layer's V virtual keys/values (passed to the
  attention as ``posttrain_virtual_kv``, see ``posttrain.models.varlen``); positions start at V, as peft's cache
  offset makes them.

So a packed forward gives each sequence exactly what plain ``peft`` gives it alone in a batch row
(tests/test_peft.py compares logits).

    >>> from peft import PromptTuningConfig, TaskType, get_peft_model
    >>> from posttrain.models.tiny import build_model, build_tokenizer
    >>> config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3)
    >>> model = get_peft_model(build_model(build_tokenizer()), config)
    >>> tokens = virtual_tokens(model)
    >>> tokens.count, tuple(tokens.embeds.shape), tokens.kv
    (3, (3, 128), None)
    >>> with adapters_disabled(model):
    ...     virtual_tokens(model) is None
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

PROMPT_TYPES = frozenset({"PROMPT_TUNING", "P_TUNING"})  # learned input embeddings
PREFIX_TYPES = frozenset({"PREFIX_TUNING"})  # learned keys and values per layer
_OFF = "_posttrain_virtual_off"


@dataclass(frozen=True)
class VirtualTokens:
    """The V virtual tokens of a prompt-learning adapter, computed once per forward (so gradients reach them):
    ``embeds`` (V, H) for prompt tuning, or ``kv`` (per layer (key, value), each (1, H_kv, V, D)) for prefix."""

    count: int
    embeds: Tensor | None = None
    kv: tuple[tuple[Tensor, Tensor], ...] | None = None


def is_prompt_learning(model: Any) -> bool:
    """Whether ``model`` is a peft model whose active adapter is prompt learning (virtual tokens)."""
    return hasattr(model, "peft_config") and bool(model.active_peft_config.is_prompt_learning)


def virtual_tokens(model: Any) -> VirtualTokens | None:
    """The active adapter's virtual tokens, or None (no peft, a layer adapter, or inside :func:`adapters_disabled`).
    Another prompt-learning type (multitask, cartridge) is refused: its tokens depend on more than the adapter."""
    if not is_prompt_learning(model) or getattr(model, _OFF, False):
        return None
    config = model.active_peft_config
    kind = str(config.peft_type.value)
    if kind in PROMPT_TYPES:
        return VirtualTokens(config.num_virtual_tokens, embeds=model.get_prompt(batch_size=1)[0])
    if kind in PREFIX_TYPES:
        cache = model.get_prompt(batch_size=1)  # peft's own shaping (grouped-query heads included)
        kv = tuple((layer.keys, layer.values) for layer in cache.layers)
        return VirtualTokens(config.num_virtual_tokens, kv=kv)
    raise ValueError(f"peft method {kind} is not supported by posttrain (use lora, dora, rslora, ia3, prompt, prefix)")


CONTINUED = "_posttrain_continued"  # set on a loaded prompt-learning adapter that a stage goes on training


def continues_adapter(model: Any) -> bool:
    """Whether ``model`` is an earlier stage's prompt/prefix adapter trained further: its starting point (the KL
    or DPO reference) is the adapter as loaded, not the base with adapters disabled."""
    return bool(getattr(model, CONTINUED, False))


@contextmanager
def adapters_disabled(model: Any) -> Iterator[None]:
    """peft's ``disable_adapter()`` that posttrain's own forwards also honour (the base model, as a reference)."""
    with model.disable_adapter():
        previous = getattr(model, _OFF, False)
        setattr(model, _OFF, True)
        try:
            yield
        finally:
            setattr(model, _OFF, previous)


def packed_inputs(
    model: Any, tokens: VirtualTokens, input_ids: Tensor, position_ids: Tensor, layout: dict[str, Any]
) -> tuple[dict[str, Any], Tensor | None]:
    """Decoder inputs for one packed row (1, S) with the adapter's virtual tokens in front of every sequence (or
    shared prompt): (keyword arguments for the base decoder, the index of the real tokens in its output, or None
    when the output has exactly the S real positions)."""
    if tokens.kv is not None:
        return dict(
            input_ids=input_ids, position_ids=position_ids + tokens.count, posttrain_virtual_kv=tokens.kv, **layout
        ), None
    v = tokens.count
    if "posttrain_groups" in layout:
        groups = layout["posttrain_groups"]
        lengths = [sum((prefix, *branches)) for prefix, branches in groups]
        new_layout = {"posttrain_groups": tuple((prefix + v, branches) for prefix, branches in groups)}
    else:
        bounds = layout.get("posttrain_bounds") or (0, input_ids.shape[1])
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        new_layout = {"posttrain_bounds": tuple(b + v * i for i, b in enumerate(bounds))}
    embeds = model.get_input_embeddings()(input_ids)[0]
    prompt = tokens.embeds.to(embeds.dtype)
    parts, real, start = [], [], 0
    for n in lengths:
        parts += [prompt, embeds[start : start + n]]
        real.append(torch.arange(start + v * (len(real) + 1), start + v * (len(real) + 1) + n))
        start += n
    slots = torch.arange(v, device=position_ids.device)
    positions = torch.cat([torch.cat([slots, p + v]) for p in position_ids[0].split(lengths)])
    inputs = dict(inputs_embeds=torch.cat(parts)[None], position_ids=positions[None], **new_layout)
    return inputs, torch.cat(real).to(input_ids.device)


def prepare_cache(model: Any, tokens: VirtualTokens, cache: Any, rows: int) -> Any:
    """Write prefix tuning's virtual keys/values into the first V slots of every layer of ``cache`` (a fresh
    posttrain or transformers cache) for ``rows`` batch rows; returns the cache."""
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.get_base_model().config)
    for layer, (key, value) in enumerate(tokens.kv):
        cache.update(key.expand(rows, -1, -1, -1), value.expand(rows, -1, -1, -1), layer)
    return cache
