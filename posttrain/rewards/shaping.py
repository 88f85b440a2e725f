"""Reward shaping on completion lengths (pure)."""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, *, max_tokens: int, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to ``max_tokens - buffer`` tokens, then a
    linear ramp to -1 at ``max_tokens``.

    >>> overlong_penalty(torch.tensor([10, 14, 16]), max_tokens=16, buffer=4)
    tensor([ 0.0000, -0.5000, -1.0000])
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    over = (lengths.float() - (max_tokens - buffer)).clamp(min=0.0)
    return (over / buffer).clamp(max=1.0).neg() + 0.0  # + 0.0 turns -0.0 into 0.0
