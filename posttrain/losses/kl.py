"""Per-token KL estimators between the policy and a reference, from sampled tokens' log-probs (Schulman 2020).

Legend: B sequences, T tokens; inputs are the log-probs of the *sampled* tokens under each model.

    >>> import torch
    >>> kl_k3(torch.tensor([[-1.0]]), torch.tensor([[-1.0]]))   # identical models -> 0
    tensor([[0.]])
"""

from __future__ import annotations

import torch
from torch import Tensor


def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 = log pi(x) - log ref(x): unbiased for KL(pi || ref), high variance, can be negative."""
    return logps - ref_logps


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 = exp(ref - pi) - (ref - pi) - 1 (log-space): unbiased, always >= 0, lower variance (used by GRPO)."""
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1.0


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}
