"""Advantage estimators for RL from verifiable rewards, as pure functions.

Legend: N prompts, G completions per prompt (a *group*). ``rewards`` is (N, G); every estimator returns (N, G),
one advantage per completion, broadcast over its tokens by the policy loss. A group whose rewards are all equal
gets advantage 0 (never NaN), and so does a group of size 1.

    >>> import torch
    >>> group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    tensor([[ 0.8660, -0.8660, -0.8660,  0.8660]])
"""

from __future__ import annotations

import torch
from torch import Tensor


def _centered(rewards: Tensor) -> Tensor:
    return rewards - rewards.mean(dim=-1, keepdim=True)


def group_advantages(rewards: Tensor, *, eps: float = 1e-6) -> Tensor:
    """GRPO (Shao et al. 2024): (r - group mean) / (group std + eps), std with Bessel's correction as in TRL."""
    if rewards.shape[-1] < 2:
        return torch.zeros_like(rewards)
    return _centered(rewards) / (rewards.std(dim=-1, keepdim=True) + eps)


def centered_advantages(rewards: Tensor) -> Tensor:
    """Dr. GRPO (Liu et al. 2025): r - group mean, no std scaling (which over-weights easy and hard prompts)."""
    return _centered(rewards)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """RLOO (Ahmadian et al. 2024): r_i - mean of the *other* G-1 rewards = G/(G-1) * (r_i - group mean)."""
    g = rewards.shape[-1]
    if g < 2:
        return torch.zeros_like(rewards)
    return _centered(rewards) * (g / (g - 1))


def reinforce_pp_advantages(rewards: Tensor, *, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ with a group baseline (Hu et al. 2025): subtract the group mean, then normalise by the std of
    the whole batch (not per group), which keeps the scale of hard and easy prompts comparable."""
    centered = _centered(rewards)
    if centered.numel() < 2:
        return torch.zeros_like(rewards)
    return centered / (centered.std() + eps)


def varied_groups(rewards: Tensor) -> Tensor:
    """(N,) bool: groups whose rewards are not all equal. DAPO's dynamic sampling keeps only these, since a
    zero-variance group has zero advantage and contributes no gradient."""
    return (rewards.max(dim=-1).values - rewards.min(dim=-1).values) > 0


ESTIMATORS = {
    "grpo": group_advantages,
    "dr_grpo": centered_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}
