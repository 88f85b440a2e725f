"""Padding-free attention for packed rows on any device: each sequence attends only to itself.

``transformers`` handles packed rows (``position_ids`` restarting at 0) with a block-diagonal (S, S) mask, which
spends attention compute on every pair of tokens in the row, most of them masked. This attention
implementation instead runs causal attention per sequence, given the sequence boundaries, and needs no mask
at all. It is registered with ``transformers.AttentionInterface`` as ``"posttrain_varlen"``; without
boundaries (for example during generation) it is plain causal SDPA.

    >>> import torch
    >>> from posttrain.models.tiny import build_tokenizer, build_model
    >>> model = build_model(build_tokenizer())
    >>> ids = torch.tensor([[5, 6, 7, 8, 9]])
    >>> with torch.no_grad():
    ...     ref = model(ids[:, 3:]).logits
    ...     with packed_attention(model):
    ...         out = model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1]]), posttrain_bounds=(0, 3, 5)).logits
    >>> torch.allclose(out[:, 3:], ref, atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "posttrain_varlen"


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query (1, H, S, D), key/value (1, H_kv, S, D) -> (1, S, H, D); bounds = (0, end_1, ..., S), or
    ``posttrain_groups`` for shared prefixes (see ``prefix_attention``)."""
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    virtual = kwargs.get("posttrain_virtual_kv")
    if virtual is not None:  # prefix tuning: this layer's learned keys/values, seen by every sequence
        virtual = tuple(t.to(key.dtype) for t in virtual[module.layer_idx])
    if kwargs.get("posttrain_groups"):
        groups = kwargs["posttrain_groups"]
        out = prefix_attention(query, key, value, groups, scale=scaling, dropout_p=p, gqa=gqa, virtual=virtual)
        return out.transpose(1, 2).contiguous(), None
    bounds = kwargs.get("posttrain_bounds") or (0, query.shape[2])
    # split (not per-sequence slicing): one backward op per tensor instead of a full-size zero-fill per slice.
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    if virtual is not None:
        parts = [
            _after(q, virtual, k, v, scale=scaling, dropout_p=p, gqa=gqa)
            for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
        ]
    else:
        qs, ks, vs = query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)
        parts = [None] * len(lengths)
        for members in buckets(lengths).values():
            out = F.scaled_dot_product_attention(
                *(padded(t, members) for t in (qs, ks, vs)), is_causal=True, scale=scaling, dropout_p=p, enable_gqa=gqa
            )
            for b, i in enumerate(members):
                parts[i] = out[b : b + 1, :, : lengths[i]]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


BUCKET = 32


def buckets(lengths: list[int]) -> dict[int, list[int]]:
    """Sequence indexes by their padded length: each length rounded up to a multiple of ``BUCKET``.

    Sequences of one bucket attend in one batched call (on a CPU the fused attention's backward costs ~1.5 ms per
    call at SmolLM2's shapes, more than the attention itself for rows of a few hundred tokens). A sequence's
    padded length depends on its own length only, never on its neighbours': the attention kernel's blocking (and
    so its rounding) follows the padded length, so a row's values are the same in any batch, micro-batch or rank.

        >>> buckets([5, 40, 31, 64, 65])
        {32: [0, 2], 64: [1, 3], 96: [4]}
    """
    out: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        out.setdefault(-(-n // BUCKET) * BUCKET, []).append(i)
    return dict(sorted(out.items()))


def padded(parts: tuple[torch.Tensor, ...], members: list[int]) -> torch.Tensor:
    """(1, H, n_i, D) parts, the ``members`` of one bucket -> (B, H, bucket, D), each zero-padded at its end (a
    causal row never sees the padding after it; the padded rows are cut off again)."""
    size = -(-max(parts[i].shape[2] for i in members) // BUCKET) * BUCKET
    return torch.cat([F.pad(parts[i], (0, 0, 0, size - parts[i].shape[2])) for i in members])


def prefix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    groups: tuple[tuple[int, tuple[int, ...]], ...],
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    gqa: bool = False,
    virtual: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention for packed groups that share a prefix: (1, H, S, D) -> (1, H, S, D).

    A group is ``(prefix_length, branch_lengths)`` laid out contiguously as [prefix][branch 1][branch 2]...;
    groups follow each other. The prefix attends causally to itself; every branch attends to the whole prefix
    and causally to itself, never to another branch. So G completions of one prompt are trained with the prompt
    computed once, and each completion sees exactly what it would see packed alone after its own prompt copy.
    """
    lengths = [n for prefix, branches in groups for n in (prefix, *branches)]
    qs, ks, vs = query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)
    kw: dict[str, Any] = dict(scale=scale, dropout_p=dropout_p, gqa=gqa)
    out, i = [], 0
    for _prefix, branches in groups:
        kp, vp = ks[i], vs[i]
        if virtual is not None:
            out.append(_after(qs[i], virtual, kp, vp, scale=scale, dropout_p=dropout_p, gqa=gqa))
            kp, vp = torch.cat([virtual[0], kp], dim=2), torch.cat([virtual[1], vp], dim=2)
        else:
            out.append(
                F.scaled_dot_product_attention(
                    qs[i], kp, vp, is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=gqa
                )
            )
        first, parts = i + 1, [None] * len(branches)
        for members in buckets(list(branches)).values():
            at = [first + m for m in members]
            shared = tuple(t.expand(len(at), -1, -1, -1) for t in (kp, vp))
            o = _after(padded(qs, at), shared, padded(ks, at), padded(vs, at), **kw)
            for b, m in enumerate(members):
                parts[m] = o[b : b + 1, :, : branches[m]]
        out += parts
        i += 1 + len(branches)
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


def _after(
    query: torch.Tensor,
    before: tuple[torch.Tensor, torch.Tensor],
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None,
    dropout_p: float,
    gqa: bool,
) -> torch.Tensor:
    """Causal attention of one sequence that also sees all of ``before`` (keys, values) in front of it: row r
    attends to every position of ``before`` and its own positions <= r (a bottom-right aligned causal mask)."""
    n, m = query.shape[2], before[0].shape[2]
    mask = torch.ones(n, m + n, dtype=torch.bool, device=query.device).tril(diagonal=m)
    k, v = torch.cat([before[0], key], dim=2), torch.cat([before[1], value], dim=2)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p, enable_gqa=gqa)


AttentionInterface.register(NAME, varlen_attention)

DECODE_NAME = "posttrain_decode"


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Generation attention: one query token per row (a decode step) is two small matmuls and a softmax, which
    on CPU beats the fused SDPA kernels' per-call overhead (most of all in bf16); prefill goes to SDPA."""
    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (B, H, 1, L)
    if attention_mask is not None:
        mask = attention_mask[..., -key.shape[2] :]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_NAME, decode_attention)
AttentionMaskInterface.register(DECODE_NAME, sdpa_mask)


def _base_config(model: Any) -> Any:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.config


@contextmanager
def attention_implementation(model: Any, name: str) -> Iterator[None]:
    """Use attention implementation ``name`` inside the block, and restore the model's own after it (so a saved
    config never names an implementation that plain ``transformers`` lacks)."""
    config = _base_config(model)
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def packed_attention(model: Any) -> Any:
    """Per-sequence (or shared-prefix) attention for packed rows inside the block."""
    return attention_implementation(model, NAME)


def decoding_attention(model: Any) -> Any:
    """``decode_attention`` inside the block, for models that use SDPA (others keep their own)."""
    if _base_config(model)._attn_implementation != "sdpa":
        return attention_implementation(model, _base_config(model)._attn_implementation)
    return attention_implementation(model, DECODE_NAME)
