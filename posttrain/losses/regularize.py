"""Regularisers toward a reference point in weight space (against forgetting)."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def l2sp_gradient_(params: list, anchor: list, coef: float) -> float:
    """Add the gradient of the L2-SP penalty coef/2 x ||w - w_start||^2 (Li et al., 2018), coef x (w - w_start),
    to each parameter's gradient (a parameter without one gets it as its gradient); returns ||w - w_start||_2.
    Works on FSDP2 shards alike (each rank its own part; the distance is this rank's part then).

        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0])); w.grad = torch.tensor([0.5, 0.5])
        >>> l2sp_gradient_([w], [torch.tensor([0.0, 2.0])], 0.1), w.grad.tolist()
        (1.0, [0.6000000238418579, 0.5])
    """
    total = 0.0
    for p, start in zip(params, anchor):
        delta = p.detach() - start
        if p.grad is None:
            p.grad = delta.mul(coef)
        else:
            p.grad.add_(delta, alpha=coef)
        local = delta.to_local() if hasattr(delta, "to_local") else delta  # an FSDP2 shard: this rank's part
        total += float(local.float().pow(2).sum())
    return math.sqrt(total)
