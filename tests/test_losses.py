"""Losses and reductions against hand-derived numbers, gradcheck, and a slow reference."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from posttrain.losses import masked_sum, sequence_mean, sft_loss, token_logps, token_mean


def test_token_logps_hand_derived():
    # Row of logits [ln 1, ln 2, ln 1] -> probabilities [1/4, 1/2, 1/4].
    logits = torch.log(torch.tensor([[[1.0, 2.0, 1.0], [1.0, 1.0, 2.0]]]))
    out = token_logps(logits, torch.tensor([[1, 0]]))
    assert_close(out, torch.tensor([[math.log(0.5), math.log(0.25)]]))


def test_sft_loss_hand_derived_with_mask():
    logits = torch.log(torch.tensor([[[1.0, 3.0], [1.0, 1.0], [9.0, 1.0]]]))
    targets = torch.tensor([[1, 0, 1]])
    mask = torch.tensor([[True, True, False]])
    losses, correct = sft_loss(logits, targets, mask)
    # -ln(3/4), -ln(1/2), masked -> 0
    assert_close(losses, torch.tensor([[-math.log(0.75), math.log(2.0), 0.0]]))
    # argmax: position 0 picks 1 (right), position 1 ties -> index 0 (right), position 2 masked.
    assert correct.tolist() == [[True, True, False]]
    assert_close(token_mean(losses, mask), torch.tensor((-math.log(0.75) + math.log(2.0)) / 2))


def test_masked_positions_cannot_leak_nan():
    values = torch.tensor([[1.0, float("nan")]])
    mask = torch.tensor([[True, False]])
    assert_close(masked_sum(values, mask), torch.tensor(1.0))
    logits = torch.tensor([[[0.0, 0.0], [float("inf"), 0.0]]])
    losses, _ = sft_loss(logits, torch.tensor([[0, 1]]), mask)
    assert torch.isfinite(losses).all()


def test_all_masked_sequence_gives_zero_not_nan():
    values = torch.tensor([[2.0, 4.0], [1.0, 1.0]])
    mask = torch.tensor([[False, False], [True, True]])
    assert_close(token_mean(values, torch.zeros_like(mask)), torch.tensor(0.0))
    # Row 0 contributes 0, row 1 has mean 1 -> (0 + 1) / 2
    assert_close(sequence_mean(values, mask), torch.tensor(0.5))


def test_token_mean_with_constant_normaliser():
    values = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, True, True]])
    assert_close(token_mean(values, mask, normaliser=12.0), torch.tensor(0.5))


def test_token_logps_matches_slow_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g)
    targets = torch.randint(0, 7, (3, 5), generator=g)
    slow = torch.empty(3, 5)
    for b in range(3):
        for t in range(5):
            row = logits[b, t]
            slow[b, t] = row[targets[b, t]] - torch.log(torch.exp(row).sum())
    assert_close(token_logps(logits, targets), slow)


def test_sft_loss_gradcheck():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 4, (2, 3), generator=g)
    mask = torch.tensor([[True, False, True], [True, True, False]])

    def f(x):
        losses, _ = sft_loss(x, targets, mask)
        return token_mean(losses.double(), mask)

    # token_logps upcasts to float32 only for lower precision; float64 stays float64.
    assert torch.autograd.gradcheck(f, (logits,))
