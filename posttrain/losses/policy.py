"""Policy-gradient losses of the GRPO family, as pure functions on per-token log-probs.

Legend: B sequences (completions), T completion tokens. ``logps`` are the current policy's log-probs of the
sampled tokens (with grad), ``old_logps`` those of the policy that sampled them (detached), ``advantages`` (B,)
one per sequence, ``mask`` (B, T) bool, True = a completion token. Every loss returns *unreduced* per-token
losses (B, T) and a dict of detached statistics; the variants differ in the ratio (token or sequence), the
clip range and the reduction (see ``POLICY_LOSSES``). ``PolicyLoss`` takes the row and token counts of the whole
optimiser step, so accumulated micro-batches (or data-parallel ranks) sum to the full batch's loss.

    >>> import torch
    >>> lp = torch.zeros(1, 2); mask = torch.ones(1, 2, dtype=torch.bool)
    >>> losses, stats = clipped_surrogate(lp, lp, torch.tensor([1.0]), mask, eps_low=0.2, eps_high=0.2)
    >>> losses, stats["clip_fraction"]       # ratio 1: loss = -A per token, nothing clipped
    (tensor([[-1., -1.]]), tensor(0.))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.losses.reduce import REDUCTIONS, masked_sum


def _stats(ratio: Tensor, clipped: Tensor, mask: Tensor) -> dict[str, Tensor]:
    n = mask.sum().clamp(min=1)
    return {
        "clip_fraction": (masked_sum(clipped.float(), mask) / n).detach(),
        "ratio_mean": (masked_sum(ratio, mask) / n).detach(),
    }


def clipped_surrogate(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, eps_low: float, eps_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped objective per token, ratio r = exp(logp - old_logp):
    loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A). eps_high > eps_low is DAPO's clip-higher."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    losses = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped) & mask
    return torch.where(mask, losses, torch.zeros((), dtype=losses.dtype)), _stats(ratio.detach(), was_clipped, mask)


def sequence_ratio_surrogate(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, eps_low: float, eps_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025): one importance ratio per sequence, s = exp(mean_t (logp - old_logp)), clipped
    as a whole. Written per token as s_t = sg[s] * exp(logp_t - sg[logp_t]) so that every token carries the
    sequence's gradient; summed over tokens and divided by the length it is the paper's sequence loss."""
    n_tokens = mask.sum(-1).clamp(min=1)
    log_s = torch.where(mask, logps - old_logps, torch.zeros((), dtype=logps.dtype)).sum(-1) / n_tokens
    seq_ratio = torch.exp(log_s.detach()).unsqueeze(-1)
    token_ratio = seq_ratio * torch.exp(logps - logps.detach())
    adv = advantages.unsqueeze(-1)
    unclipped = token_ratio * adv
    clipped = torch.clamp(token_ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    losses = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped) & mask
    return torch.where(mask, losses, torch.zeros((), dtype=losses.dtype)), _stats(
        token_ratio.detach().expand_as(logps), was_clipped, mask
    )


@dataclass(frozen=True)
class PolicyLoss:
    """A named variant: a surrogate, its clip range and its reduction. Chosen by name through POLICY_LOSSES."""

    surrogate: Callable[..., tuple[Tensor, dict[str, Tensor]]]
    reduce: Callable[..., Tensor]
    eps_low: float
    eps_high: float

    def __call__(
        self,
        logps: Tensor,
        old_logps: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        max_tokens: int,
        num_rows: int | Tensor | None = None,
        num_tokens: int | Tensor | None = None,
        eps_low: float | None = None,
        eps_high: float | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss and statistics (local to this batch). ``max_tokens`` is the generation limit (used by the
        constant normaliser); ``num_rows`` and ``num_tokens`` are the completion and completion-token counts of the
        whole optimiser step (default: this batch's). ``self.reduce`` takes the same counts, for a KL term.

        >>> import torch
        >>> lp, adv = torch.zeros(2, 2), torch.tensor([1.0, -1.0])
        >>> mask = torch.tensor([[True, True], [True, False]])
        >>> dapo = POLICY_LOSSES["dapo"]
        >>> whole, _ = dapo(lp, lp, adv, mask, max_tokens=2)
        >>> parts = sum(dapo(lp[i:i + 1], lp[i:i + 1], adv[i:i + 1], mask[i:i + 1], max_tokens=2, num_rows=2,
        ...                  num_tokens=3)[0] for i in range(2))
        >>> whole, parts
        (tensor(-0.3333), tensor(-0.3333))
        """
        losses, stats = self.surrogate(
            logps,
            old_logps,
            advantages,
            mask,
            eps_low=self.eps_low if eps_low is None else eps_low,
            eps_high=self.eps_high if eps_high is None else eps_high,
        )
        return self.reduce(losses, mask, max_tokens=max_tokens, num_rows=num_rows, num_tokens=num_tokens), stats


POLICY_LOSSES: dict[str, PolicyLoss] = {
    # GRPO: token ratio, symmetric clip, mean over each sequence's tokens then over sequences.
    "grpo": PolicyLoss(clipped_surrogate, REDUCTIONS["sequence_mean"], 0.2, 0.2),
    # Dr. GRPO: as GRPO but a constant normaliser (and, with it, the centred advantage estimator).
    "dr_grpo": PolicyLoss(clipped_surrogate, REDUCTIONS["constant"], 0.2, 0.2),
    # DAPO: clip-higher and a token-level mean over the whole batch.
    "dapo": PolicyLoss(clipped_surrogate, REDUCTIONS["token_mean"], 0.2, 0.28),
    # GSPO: sequence-level ratio with a tight clip range.
    "gspo": PolicyLoss(sequence_ratio_surrogate, REDUCTIONS["sequence_mean"], 3e-4, 4e-4),
}
