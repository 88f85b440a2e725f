"""Distillation losses over token distributions: forward KL, reverse KL and the generalised Jensen-Shannon
divergence of GKD (Agarwal et al. 2024, "On-policy distillation of language models"), per token, unreduced.

Legend: n tokens, V vocabulary (or K+1 bins, see :func:`topk_bins`). Inputs are log-distributions (log-softmax
of logits / temperature) of the student and the teacher at the same positions; outputs are (n,) per-token
divergences in nats. The convention is TRL's ``GKDTrainer.generalized_jsd_loss``: with the mixture
M = β·P_teacher + (1-β)·P_student,

    JSD_β = β·KL(P_teacher ‖ M) + (1-β)·KL(P_student ‖ M),

and at the ends (where that form vanishes) β = 0 is the forward KL(P_teacher ‖ P_student) (mode-covering,
what classic KD minimises) and β = 1 the reverse KL(P_student ‖ P_teacher) (mode-seeking). Zero-probability
entries contribute 0 (0·log 0 = 0), never NaN.

    >>> import torch
    >>> s = torch.log_softmax(torch.tensor([[0.0, 0.0]]), -1)
    >>> t = torch.log(torch.tensor([[0.75, 0.25]]))
    >>> round(float(forward_kl(s, t)), 4)   # 0.75 ln 1.5 + 0.25 ln 0.5
    0.1308
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _kl(p_logps: Tensor, q_logps: Tensor) -> Tensor:
    """KL(P ‖ Q) over the last dimension, with 0 · log(0 / q) = 0."""
    p = p_logps.exp()
    return torch.where(p > 0, p * (p_logps - q_logps), torch.zeros_like(p)).sum(-1)


def forward_kl(student_logps: Tensor, teacher_logps: Tensor) -> Tensor:
    """KL(P_teacher ‖ P_student) per token: (n, V) log-distributions -> (n,)."""
    return _kl(teacher_logps, student_logps)


def reverse_kl(student_logps: Tensor, teacher_logps: Tensor) -> Tensor:
    """KL(P_student ‖ P_teacher) per token: (n, V) log-distributions -> (n,)."""
    return _kl(student_logps, teacher_logps)


def generalized_jsd(student_logps: Tensor, teacher_logps: Tensor, *, beta: float = 0.5) -> Tensor:
    """β·KL(P_t ‖ M) + (1-β)·KL(P_s ‖ M), M = β·P_t + (1-β)·P_s, per token (n,); β = 0 / 1 are forward / reverse
    KL exactly (the limits of the general form are 0, so the ends are special-cased as in GKD and TRL).

    >>> import torch
    >>> p = torch.log_softmax(torch.randn(3, 5), -1)
    >>> bool(generalized_jsd(p, p, beta=0.3).abs().max() < 1e-6)
    True
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logps, teacher_logps)
    if beta == 1.0:
        return reverse_kl(student_logps, teacher_logps)
    mixture = torch.logsumexp(
        torch.stack([teacher_logps + math.log(beta), student_logps + math.log(1.0 - beta)]), dim=0
    )
    return beta * _kl(teacher_logps, mixture) + (1.0 - beta) * _kl(student_logps, mixture)


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd}


def divergence(name: str, student_logps: Tensor, teacher_logps: Tensor, *, beta: float = 0.5) -> Tensor:
    """The divergence called ``name`` (``forward_kl``, ``reverse_kl``, ``jsd`` with ``beta``), per token."""
    if name == "jsd":
        return generalized_jsd(student_logps, teacher_logps, beta=beta)
    return DIVERGENCES[name](student_logps, teacher_logps)


def topk_bins(logits: Tensor, indices: Tensor) -> Tensor:
    """A distribution coarsened to K+1 bins: the K tokens of ``indices`` and one bin for the rest of the vocabulary.

    ``logits`` (n, V) (already divided by the temperature), ``indices`` (n, K) distinct token ids per position.
    Returns (n, K+1) log-probabilities: log p(token k) for each index, then log(1 - Σ_k p(token k)), computed
    as a log-sum-exp over the other tokens (no cancellation). A teacher's top-K cache holds its own bins, and
    the student is compared with it on the same bins: the divergence of the coarsened pair, a lower bound of the
    full one that equals it when the top K hold all the teacher's mass.

    >>> import torch
    >>> bins = topk_bins(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), torch.tensor([[0, 2]]))
    >>> [round(float(x), 4) for x in bins.exp()[0]]   # p(0), p(2), p(1) + p(3)
    [0.6439, 0.0871, 0.2689]
    """
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    picked = torch.gather(logits, -1, indices) - lse
    rest = logits.scatter(-1, indices, float("-inf"))
    rest_logps = torch.logsumexp(rest, dim=-1, keepdim=True) - lse
    return torch.cat([picked, rest_logps], dim=-1)
