"""DPO-family losses against hand-derived numbers; symmetry; log 2 at the start; gradients."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.preference import (
    PAIRED_LOSSES,
    cdpo_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# pc = -1, pr = -3, rc = rr = -2: h = (-1 + 2) - (-3 + 2) = 2.
PC, PR, RC, RR = t(-1.0), t(-3.0), t(-2.0), t(-2.0)
LENGTHS = {"chosen_lengths": t(2.0), "rejected_lengths": t(4.0)}


def softplus(x):  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def test_dpo_hand_derived():
    loss, stats = dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert float(loss) == pytest.approx(softplus(-1.0))  # -log sigma(0.5 * 2) = log(1 + e^-1) = 0.31326
    assert float(loss) == pytest.approx(0.3132617, abs=1e-6)
    assert float(stats["chosen_rewards"]) == 0.5 and float(stats["rejected_rewards"]) == -0.5
    assert float(stats["margin"]) == 1.0 and float(stats["accuracy"]) == 1.0


def test_swapping_chosen_and_rejected_negates_the_margin():
    loss, stats = dpo_loss(PC, PR, RC, RR, beta=0.5)
    swapped, swapped_stats = dpo_loss(PR, PC, RR, RC, beta=0.5)
    assert float(swapped_stats["margin"]) == -float(stats["margin"])
    assert float(swapped) == pytest.approx(softplus(1.0))  # 1.31326
    assert float(swapped) - float(loss) == pytest.approx(1.0)  # softplus(x) - softplus(-x) = x
    assert float(swapped_stats["accuracy"]) == 0.0


def test_policy_equal_to_reference_gives_log_2_for_dpo_and_cdpo():
    z = t(-4.2, -7.0)
    for fn in (dpo_loss, cdpo_loss):
        loss, stats = fn(z, z - 1, z, z - 1, beta=0.1)
        assert torch.allclose(loss, torch.full_like(loss, math.log(2)))
        assert not stats["margin"].any()


def test_cdpo_hand_derived():
    loss, _ = cdpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    # 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    assert float(loss) == pytest.approx(0.9 * softplus(-1.0) + 0.1 * softplus(1.0))
    assert float(loss) == pytest.approx(0.4132617, abs=1e-6)


def test_ipo_hand_derived():
    loss, _ = ipo_loss(PC, PR, RC, RR, beta=0.5, **LENGTHS)
    # length-averaged: chosen 1/2 = 0.5, rejected -1/4 = -0.25, h = 0.75; target 1/(2 * 0.5) = 1 -> 0.0625
    assert float(loss) == pytest.approx(0.0625)


def test_simpo_hand_derived():
    loss, stats = simpo_loss(PC, PR, None, None, beta=2.0, gamma=0.5, **LENGTHS)
    # 2 * (-1/2) = -1, 2 * (-3/4) = -1.5; -1 - (-1.5) - 0.5 = 0 -> log 2
    assert float(loss) == pytest.approx(math.log(2))
    assert float(stats["margin"]) == pytest.approx(0.5)


def test_orpo_hand_derived():
    loss, _ = orpo_loss(PC, PR, None, None, beta=0.1, **LENGTHS)
    mean_c, mean_r = -0.5, -0.75
    odds = (mean_c - math.log(1 - math.exp(mean_c))) - (mean_r - math.log(1 - math.exp(mean_r)))  # 0.54340
    assert odds == pytest.approx(0.54340, abs=1e-5)
    assert float(loss) == pytest.approx(0.5 + 0.1 * softplus(-odds))  # 0.5 + 0.1 * 0.45791 = 0.545791
    assert float(loss) == pytest.approx(0.545791, abs=1e-5)


def test_kto_hand_derived():
    loss, stats = kto_loss(t(-1.0, -2.0), t(-2.0, -1.0), torch.tensor([True, False]), beta=1.0)
    # r = [1, -1], z = max(0, mean r) = 0; desirable: 1 - sigma(1); undesirable: 1 - sigma(0 - (-1)) = 1 - sigma(1)
    expected = 1 - 1 / (1 + math.exp(-1))  # 0.268941
    assert loss.tolist() == pytest.approx([expected, expected])
    assert float(stats["kl"]) == 0.0
    loss, stats = kto_loss(t(-1.0, -1.0), t(-2.0, -3.0), torch.tensor([True, True]), beta=1.0)
    # r = [1, 2], z = 1.5: 1 - sigma(-0.5), 1 - sigma(0.5)
    assert float(stats["kl"]) == 1.5
    assert loss.tolist() == pytest.approx([1 - 1 / (1 + math.exp(0.5)), 1 - 1 / (1 + math.exp(-0.5))])


@pytest.mark.parametrize("name", sorted(PAIRED_LOSSES))
def test_paired_losses_gradcheck(name):
    fn = PAIRED_LOSSES[name]
    inputs = [torch.tensor([-1.3, -2.0], dtype=torch.float64, requires_grad=True) for _ in range(2)]
    refs = [torch.tensor([-1.1, -2.4], dtype=torch.float64), torch.tensor([-1.8, -1.9], dtype=torch.float64)]
    lengths = {"chosen_lengths": t(3.0, 5.0), "rejected_lengths": t(2.0, 4.0)}

    def f(pc, pr):
        return fn(pc, pr, refs[0], refs[1], beta=0.3, **lengths)[0]

    assert torch.autograd.gradcheck(f, tuple(inputs))
    # Raising the chosen log-prob never increases the loss (for every variant).
    grads = torch.autograd.grad(f(*inputs).sum(), inputs)
    assert (grads[0] <= 0).all() and (grads[1] >= 0).all()
