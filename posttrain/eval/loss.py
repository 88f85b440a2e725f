"""One forward pass over a packed batch, shared by training, held-out loss, perplexity, preference and RL
log-probs: the decoder's last hidden states go through the output head a chunk of tokens at a time
(``posttrain.losses.chunked``), so the full (S, V) logits never exist.

Legend: S tokens of the packed row, n positions read, H hidden size, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from posttrain.data.batching import PackedBatch, pack
from posttrain.data.encode import Example
from posttrain.models.forward import target_logps


def packed_token_losses(model: Any, batch: PackedBatch) -> tuple[Tensor, Tensor]:
    """Per-token NLL (1, S) (0 where not a target) and argmax-correct (1, S) bool for a packed batch (the head
    runs on target positions only: ``target_logps``)."""
    logps, where, stats = target_logps(model, batch)
    losses = torch.zeros(batch.targets.shape, dtype=logps.dtype, device=logps.device).masked_scatter(
        batch.target_mask, -logps
    )
    right = torch.zeros_like(batch.target_mask).masked_scatter(
        batch.target_mask, stats["argmax"] == batch.targets[0, where]
    )
    return losses, right


@torch.no_grad()
def mean_nll(model: Any, examples: Sequence[Example], *, batch_size: int = 64) -> dict[str, float]:
    """Token-mean negative log-likelihood over ``examples`` and its perplexity (model put in eval mode)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    total, count, correct = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = pack(list(examples[start : start + batch_size])).to(device)
        losses, right = packed_token_losses(model, batch)
        total += float(losses.sum())
        count += batch.num_target_tokens
        correct += int(right.sum())
    model.train(was_training)
    nll = total / max(count, 1)
    return {
        "loss": nll,
        "perplexity": math.exp(min(nll, 50.0)),
        "token_accuracy": correct / max(count, 1),
        "tokens": count,
    }
