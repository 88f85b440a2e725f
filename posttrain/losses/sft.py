"""Supervised fine-tuning / causal-LM loss. Legend: B rows, T tokens, V vocabulary."""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.losses.logprobs import token_logps


def sft_loss(logits: Tensor, targets: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token negative log-likelihood of ``targets`` (already shifted: position t predicts targets[t]).

    Args: logits (B, T, V); targets (B, T) token ids; loss_mask (B, T) bool, True = trained on.
    Returns (losses (B, T) with 0 where masked, correct (B, T) bool: argmax == target, detached).

    >>> import torch
    >>> logits = torch.zeros(1, 2, 4)            # uniform over 4 tokens
    >>> losses, _ = sft_loss(logits, torch.tensor([[1, 2]]), torch.tensor([[True, False]]))
    >>> losses                                   # log 4 on the counted token, 0 on the masked one
    tensor([[1.3863, 0.0000]])
    """
    nll = -token_logps(logits, targets)
    losses = torch.where(loss_mask, nll, torch.zeros((), dtype=nll.dtype))
    correct = (logits.detach().argmax(-1) == targets) & loss_mask
    return losses, correct
