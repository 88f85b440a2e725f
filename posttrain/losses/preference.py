"""Preference losses of the DPO family, as pure functions of per-sequence log-probabilities.

Legend: B pairs. ``*_logps`` are (B,) sums of completion-token log-probs under the policy (``pc``, ``pr``: chosen,
rejected) or the frozen reference (``rc``, ``rr``); ``*_lengths`` count the completion tokens. Each function
returns (per-pair loss (B,), stats) where stats hold the implicit rewards ``chosen_rewards`` = beta (pc - rc),
``rejected_rewards`` = beta (pr - rr) (reference-free losses use beta x mean log-prob) for the metrics.

- ``dpo``   -log sigma(beta h), h = (pc - rc) - (pr - rr)                          (Rafailov et al. 2023)
- ``cdpo``  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)  (conservative DPO: label smoothing eps)
- ``ipo``   (h_mean - 1 / (2 beta))^2 with length-averaged log-probs                (Azar et al. 2023)
- ``simpo`` -log sigma(beta (pc/|c| - pr/|r|) - gamma), no reference               (Meng et al. 2024)
- ``orpo``  NLL(chosen, token mean) - lambda log sigma(log odds(c) - log odds(r)), no reference (Hong et al. 2024)
- ``kto``   unpaired (see ``kto_loss``)                                            (Ethayarajh et al. 2024)

and the reward model's Bradley-Terry loss ``bradley_terry_loss`` on scalar rewards.

With the policy equal to the reference, h = 0 and the DPO loss is exactly log 2:

    >>> import torch
    >>> z = torch.tensor([-3.0])
    >>> loss, _ = dpo_loss(z, z - 1, z, z - 1, beta=0.1)
    >>> round(float(loss), 6) == round(math.log(2), 6)
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _stats(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    return {
        "chosen_rewards": chosen.detach(),
        "rejected_rewards": rejected.detach(),
        "margin": (chosen - rejected).detach(),
        "accuracy": (chosen > rejected).float().detach(),
    }


def dpo_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: Any) -> tuple[Tensor, dict]:
    """-log sigma(beta ((pc - rc) - (pr - rr)))."""
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return -F.logsigmoid(chosen - rejected), _stats(chosen, rejected)


def cdpo_loss(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float = 0.1, **_: Any
) -> tuple[Tensor, dict]:
    """DPO with labels flipped with probability ``label_smoothing`` (robust to noisy preferences)."""
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    h = chosen - rejected
    loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return loss, _stats(chosen, rejected)


def ipo_loss(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    **_: Any,
) -> tuple[Tensor, dict]:
    """(h - 1/(2 beta))^2 on length-averaged log-prob ratios: regresses the margin to a fixed target."""
    chosen, rejected = (pc - rc) / chosen_lengths, (pr - rr) / rejected_lengths
    loss = (chosen - rejected - 1 / (2 * beta)) ** 2
    return loss, _stats(beta * chosen, beta * rejected)


def simpo_loss(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor | None,
    rr: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    gamma: float = 0.5,
    **_: Any,
) -> tuple[Tensor, dict]:
    """-log sigma(beta (mean logp(c) - mean logp(r)) - gamma); no reference model."""
    chosen, rejected = beta * pc / chosen_lengths, beta * pr / rejected_lengths
    return -F.logsigmoid(chosen - rejected - gamma), _stats(chosen, rejected)


def orpo_loss(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor | None,
    rr: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    **_: Any,
) -> tuple[Tensor, dict]:
    """Token-mean NLL of the chosen reply plus beta x the odds-ratio term (beta is ORPO's lambda)."""
    mean_c, mean_r = pc / chosen_lengths, pr / rejected_lengths
    log_odds = (mean_c - torch.log1p(-mean_c.exp().clamp(max=1 - 1e-6))) - (
        mean_r - torch.log1p(-mean_r.exp().clamp(max=1 - 1e-6))
    )
    loss = -mean_c - beta * F.logsigmoid(log_odds)
    return loss, _stats(beta * mean_c, beta * mean_r)


def kto_reference_point(policy: Tensor, reference: Tensor) -> Tensor:
    """KTO's reference point z = max(0, mean over rows of (policy - reference)), detached: the batch's own KL
    estimate. Compute it once over the whole optimiser step (a no-grad pass, or the sum and the row count
    all-reduced across data-parallel ranks, then clamped) and pass it to every micro-batch's ``kto_loss``.

    >>> kto_reference_point(torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -3.0]))
    tensor(1.5000)
    """
    return (policy - reference).detach().mean().clamp(min=0)


def kto_loss(
    policy: Tensor,
    reference: Tensor,
    desirable: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reference_point: float | Tensor | None = None,
    **_: Any,
) -> tuple[Tensor, dict]:
    """KTO on unpaired rows: ``policy``/``reference`` (B,) sequence log-probs, ``desirable`` (B,) bool labels.

    r = policy - reference; z = ``reference_point`` or, by default, ``kto_reference_point(policy, reference)`` =
    max(0, mean r over this batch), detached (the batch's own KL estimate; TRL uses mismatched prompt/completion
    pairs for it); loss = w_D (1 - sigma(beta (r - z))) for desirable rows and w_U (1 - sigma(beta (z - r))) for
    undesirable ones. z depends on the whole batch, so micro-batches match the full batch only when they are
    given the whole step's z.

    >>> loss, stats = kto_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([True]), beta=1.0)
    >>> loss, stats["kl"]                         # r = 0, z = 0: 1 - sigma(0)
    (tensor([0.5000]), tensor(0.))
    """
    ratio = policy - reference
    if reference_point is None:
        z = kto_reference_point(policy, reference)
    else:
        z = torch.as_tensor(reference_point, dtype=ratio.dtype, device=ratio.device).detach()
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio)))
    loss = torch.where(desirable, good, bad)
    rewards = (beta * ratio).detach()
    return loss, {"rewards": rewards, "kl": z, "desirable": desirable.float()}


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pair -log sigma(r_c - r_r - margin).

    >>> float(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])))  # log 2
    0.6931471824645996
    """
    diff = chosen - rejected - (0.0 if margin is None else margin)
    return -F.logsigmoid(diff)


PAIRED_LOSSES = {"dpo": dpo_loss, "cdpo": cdpo_loss, "ipo": ipo_loss, "simpo": simpo_loss, "orpo": orpo_loss}
REFERENCE_FREE = {"simpo", "orpo"}
LOG2 = math.log(2)
