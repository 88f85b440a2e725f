"""PPO pieces as pure functions: GAE, advantage whitening, the clipped value loss and the KL controllers.

Legend: B sequences, T token positions; ``mask`` (B, T) marks real (generated) tokens, left-aligned. The per-token
policy and value losses are reduced with ``token_mean(..., normaliser=tokens of the whole minibatch)``, so
accumulated micro-batches or data-parallel ranks sum to the minibatch's loss; ``whiten`` takes the partial sums
of the whole batch (``whiten_sums``, summed over ranks) for the same reason.

    >>> import torch
    >>> adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]]), torch.ones(1, 2), gamma=1.0, lam=1.0)
    >>> adv.tolist(), ret.tolist()
    ([[0.5, 0.5]], [[1.0, 1.0]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def shaped_rewards(scores: Tensor, kl_tokens: Tensor, mask: Tensor, *, kl_coef: float) -> Tensor:
    """Per-token RLHF reward: -kl_coef x (log pi - log pi_ref) at every generated token, plus the sequence's
    score at its last token. (B,), (B, T), (B, T) -> (B, T).

    >>> shaped_rewards(torch.tensor([1.0]), torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[1, 1, 0]]), kl_coef=0.1)
    tensor([[-0.0500,  0.9500,  0.0000]])
    """
    rewards = torch.where(mask.bool(), -kl_coef * kl_tokens, torch.zeros((), dtype=kl_tokens.dtype))
    last = mask.sum(-1).long() - 1
    return rewards.index_put((torch.arange(len(scores)), last), scores.to(rewards.dtype), accumulate=True)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation per token: delta_t = r_t + gamma V_{t+1} - V_t (V after the last real
    token is 0), A_t = delta_t + gamma lam A_{t+1}; returns (advantages, returns = advantages + values), both 0
    outside ``mask``."""
    mask = mask.to(values.dtype)
    b, t = rewards.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(b, dtype=values.dtype, device=values.device)
    running = torch.zeros_like(next_value)
    for i in reversed(range(t)):
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        running = (delta + gamma * lam * running) * mask[:, i]
        advantages[:, i] = running
        next_value = values[:, i] * mask[:, i]
    return advantages, (advantages + values) * mask


def whiten_sums(x: Tensor, mask: Tensor) -> Tensor:
    """(3,) partial sums [sum, sum of squares, count] of ``x`` over the masked entries: what a data-parallel rank
    contributes to whitening over the global batch. Sum them across ranks (one all-reduce) and pass the result to
    ``whiten(..., stats=...)``.

    >>> whiten_sums(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[True, True, False]]))
    tensor([ 4., 10.,  2.])
    """
    m = mask.to(x.dtype)
    xm = x * m
    return torch.stack([xm.sum(), (xm * xm).sum(), m.sum()])


def whiten(
    x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8, stats: Tensor | None = None
) -> Tensor:
    """(x - mean) / std over the masked entries (mean kept when ``shift_mean`` is False); 0 outside the mask.

    The mean and (biased) variance are this batch's (two-pass), unless ``stats`` gives the partial sums
    [sum, sum of squares, count] of the whole batch (``whiten_sums`` summed over ranks), in which case
    mean = sum / count and var = sum of squares / count - mean^2.

    >>> x, mask = torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[True, True, False]])
    >>> whiten(x, mask)
    tensor([[-1.,  1.,  0.]])
    >>> whiten(x, mask, stats=whiten_sums(x, mask))
    tensor([[-1.,  1.,  0.]])
    """
    m = mask.to(x.dtype)
    if stats is None:
        n = m.sum().clamp(min=1)
        mean = (x * m).sum() / n
        var = (((x - mean) * m) ** 2).sum() / n
    else:
        total, total_sq, count = stats.to(x.dtype).unbind()
        n = count.clamp(min=1)
        mean = total / n
        var = (total_sq / n - mean * mean).clamp(min=0)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out + (0 if shift_mean else mean)) * m


def token_surrogate(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, clip: float) -> Tensor:
    """Per-token PPO policy loss with per-token advantages: -min(r A_t, clip(r, 1 +- clip) A_t), r = exp(logp -
    old_logp); 0 outside ``mask``."""
    ratio = torch.exp(logps - old_logps)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return -surrogate * mask.to(surrogate.dtype)


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float) -> Tensor:
    """Per-token 0.5 max((V - R)^2, (clip(V, V_old +- clip) - R)^2): the value may not move more than ``clip``
    from its rollout-time estimate for free."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2) * mask.to(values.dtype)


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon). KL above the
    target raises the coefficient, below lowers it; ``n_steps`` samples move it by their share of the horizon.

    >>> c = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    >>> c.update(kl=12.0, n_steps=1000); round(c.value, 4)   # error clipped to +0.2: x (1 + 0.2 * 0.1)
    0.102
    """

    value: float
    target: float
    horizon: int

    def update(self, kl: float, n_steps: int) -> None:
        if not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])


def kl_exceeds(mean_kl: float, bound: float) -> bool:
    """TRPO-style trust region check: stop the epoch (or backtrack) once the mean KL to the rollout policy
    exceeds ``bound``."""
    return bound > 0 and mean_kl > bound
