"""Per-token log-probabilities of chosen tokens. Legend: B batch rows, T tokens, V vocabulary."""

from __future__ import annotations

import torch
from torch import Tensor


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] per position: (B, T, V), (B, T) -> (B, T).

    Computed as ``logit[target] - logsumexp(logits)``, which never materialises a second (B, T, V) tensor.

    >>> import torch
    >>> logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    >>> token_logps(logits, torch.tensor([[1]])).exp()
    tensor([[0.2500]])
    """
    logits = logits if logits.dtype == torch.float64 else logits.float()
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
