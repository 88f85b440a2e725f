"""Teacher-forced log-probs of rollout completions: what the trainer computes, with gradient, for the tokens the
engine sampled. Same distribution as the engine's (logits / temperature), so on one model the two agree to
float precision — their largest difference is logged as a bug signal.

Legend: B completions, T completion tokens (as in ``Rollouts``).
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.data.batching import pack
from posttrain.data.encode import Example
from posttrain.losses.logprobs import token_logps
from posttrain.models.varlen import packed_attention
from posttrain.rollout.engine import Rollouts


def completion_logps(
    model: Any, rollouts: Rollouts, *, temperature: float = 1.0, rows: Any = None, with_entropy: bool = False
) -> Any:
    """(b, T) log-probs of the completion tokens of ``rows`` (default: all) under ``model``, one packed forward;
    with ``with_entropy`` also the (b, T) entropy of each token's distribution (detached).

    Positions past a completion's end are 0. Gradient flows when called outside ``torch.no_grad()``.
    """
    rows = list(range(len(rollouts.prompt_index))) if rows is None else list(rows)
    examples = []
    for r in rows:
        prompt = rollouts.prompt_ids[rollouts.prompt_index[r]]
        completion = rollouts.completion_ids[r][rollouts.mask[r]].tolist()
        examples.append(Example(prompt + completion, [False] * len(prompt) + [True] * len(completion)))
    batch = pack(examples).to(rollouts.completion_ids.device)
    with packed_attention(model):
        logits = model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, posttrain_bounds=batch.bounds, use_cache=False
        ).logits
    scale = temperature if temperature > 0 else 1.0
    scaled = logits / scale
    where = batch.target_mask[0]
    flat = token_logps(scaled, batch.targets)[0][where]
    sub_mask = rollouts.mask[rows]
    out = torch.zeros(len(rows), rollouts.mask.shape[1], dtype=flat.dtype, device=flat.device).masked_scatter(
        sub_mask, flat
    )
    if not with_entropy:
        return out
    with torch.no_grad():
        logp_all = torch.log_softmax(scaled[0][where].float(), -1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return out, torch.zeros_like(out).masked_scatter(sub_mask, ent)
