"""Reductions of per-token values: the one place where "mean over what" is decided.

Legend: B rows, T tokens. ``mask`` is bool, True = the token counts.

Every reduction takes optional counts of the *whole optimiser step* (``normaliser`` / ``num_tokens`` for the
token mean, ``num_rows`` for the sequence mean and the constant normaliser). Left at None they are this batch's
own counts. Passed the counts of the whole step, each reduction is a plain sum over the batch's rows divided by a
constant, so the losses of accumulated micro-batches (or of data-parallel ranks) add up to the loss of the full
batch, and so do their gradients:

    >>> import torch
    >>> values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    >>> mask = torch.tensor([[True, True, True], [True, False, False]])
    >>> whole = token_mean(values, mask)
    >>> parts = token_mean(values[:1], mask[:1], normaliser=4) + token_mean(values[1:], mask[1:], normaliser=4)
    >>> bool(torch.isclose(whole, parts))
    True
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` where ``mask`` is True (a masked NaN does not leak into the sum).

    >>> import torch
    >>> masked_sum(torch.tensor([1.0, float("nan")]), torch.tensor([True, False]))
    tensor(1.)
    """
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype)).sum()


def token_mean(values: Tensor, mask: Tensor, *, normaliser: float | Tensor | None = None) -> Tensor:
    """Sum over counted tokens divided by ``normaliser`` (default: the number of counted tokens here).

    Passing the token count of the *whole* step as ``normaliser`` makes gradient accumulation exact: the sum
    of micro-batch losses equals the loss of the full batch.

    >>> import torch
    >>> token_mean(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[True, True, False]]))
    tensor(1.5000)
    """
    if normaliser is None:
        normaliser = mask.sum().clamp(min=1)
    return masked_sum(values, mask) / normaliser


def row_mean(values: Tensor, *, num_rows: int | Tensor | None = None) -> Tensor:
    """Sum of per-row losses (B,) divided by ``num_rows`` (default: the rows here, i.e. the mean): the reduction of
    the per-pair preference losses, KTO and the reward model's Bradley-Terry loss. Pass the whole step's row count
    to accumulate micro-batches exactly.

    >>> import torch
    >>> row_mean(torch.tensor([1.0, 3.0])), row_mean(torch.tensor([1.0]), num_rows=2)
    (tensor(2.), tensor(0.5000))
    """
    if num_rows is None:
        return values.mean()
    return values.sum() / num_rows


def sequence_mean(values: Tensor, mask: Tensor, *, num_rows: int | Tensor | None = None) -> Tensor:
    """Sum over rows of each row's token mean, divided by ``num_rows`` (default: the rows here). A row with no
    counted token contributes 0. Pass the whole step's row count to accumulate micro-batches exactly.

    >>> import torch
    >>> sequence_mean(torch.tensor([[1.0, 3.0], [4.0, 0.0]]), torch.tensor([[True, True], [True, False]]))
    tensor(3.)
    >>> sequence_mean(torch.tensor([[1.0, 3.0]]), torch.tensor([[True, True]]), num_rows=2)   # one row of two
    tensor(1.)
    """
    per_row = torch.where(mask, values, torch.zeros((), dtype=values.dtype)).sum(-1)
    row_means = per_row / mask.sum(-1).clamp(min=1)
    if num_rows is None:
        return row_means.mean()
    return row_means.sum() / num_rows


def constant_normaliser_mean(
    values: Tensor, mask: Tensor, *, max_tokens: int, num_rows: int | Tensor | None = None
) -> Tensor:
    """Dr. GRPO's reduction: sum over counted tokens / (num_rows * max_tokens), a constant independent of lengths,
    so long wrong answers are not penalised less per token than short ones. ``num_rows`` defaults to the rows here.

    >>> import torch
    >>> constant_normaliser_mean(torch.tensor([[2.0, 2.0], [4.0, 0.0]]), torch.tensor([[True, True], [True, False]]),
    ...                          max_tokens=4)
    tensor(1.)
    """
    rows = values.shape[0] if num_rows is None else num_rows
    return masked_sum(values, mask) / (rows * max_tokens)


# One signature (values, mask, *, max_tokens, num_rows=None, num_tokens=None) so a variant can name its reduction;
# each passes on the whole-step count it needs and ignores the others.
REDUCTIONS = {
    "token_mean": lambda values, mask, *, max_tokens, num_rows=None, num_tokens=None: token_mean(
        values, mask, normaliser=num_tokens
    ),
    "sequence_mean": lambda values, mask, *, max_tokens, num_rows=None, num_tokens=None: sequence_mean(
        values, mask, num_rows=num_rows
    ),
    "constant": lambda values, mask, *, max_tokens, num_rows=None, num_tokens=None: constant_normaliser_mean(
        values, mask, max_tokens=max_tokens, num_rows=num_rows
    ),
}
