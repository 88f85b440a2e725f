"""Reductions of per-token values: the one place where "mean over what" is decided.

Legend: B rows, T tokens. ``mask`` is bool, True = the token counts.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` where ``mask`` is True (a masked NaN does not leak into the sum)."""
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype)).sum()


def token_mean(values: Tensor, mask: Tensor, *, normaliser: float | Tensor | None = None) -> Tensor:
    """Sum over counted tokens divided by ``normaliser`` (default: the number of counted tokens here).

    Passing the token count of the *whole* batch as ``normaliser`` makes gradient accumulation exact: the sum
    of micro-batch losses equals the loss of the full batch.

    >>> import torch
    >>> token_mean(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[True, True, False]]))
    tensor(1.5000)
    """
    if normaliser is None:
        normaliser = mask.sum().clamp(min=1)
    return masked_sum(values, mask) / normaliser


def sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over rows of each row's token mean (rows with no counted token contribute 0).

    >>> import torch
    >>> sequence_mean(torch.tensor([[1.0, 3.0], [4.0, 0.0]]), torch.tensor([[True, True], [True, False]]))
    tensor(3.)
    """
    per_row = torch.where(mask, values, torch.zeros((), dtype=values.dtype)).sum(-1)
    return (per_row / mask.sum(-1).clamp(min=1)).mean()


def constant_normaliser_mean(values: Tensor, mask: Tensor, *, max_tokens: int) -> Tensor:
    """Dr. GRPO's reduction: sum over counted tokens / (rows * max_tokens), a constant independent of lengths, so
    long wrong answers are not penalised less per token than short ones.

    >>> import torch
    >>> constant_normaliser_mean(torch.tensor([[2.0, 2.0], [4.0, 0.0]]), torch.tensor([[True, True], [True, False]]),
    ...                          max_tokens=4)
    tensor(1.)
    """
    return masked_sum(values, mask) / (values.shape[0] * max_tokens)


# One signature (values, mask, *, max_tokens) so a variant can name its reduction.
REDUCTIONS = {
    "token_mean": lambda values, mask, *, max_tokens: token_mean(values, mask),
    "sequence_mean": lambda values, mask, *, max_tokens: sequence_mean(values, mask),
    "constant": constant_normaliser_mean,
}
