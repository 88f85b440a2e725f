"""PPO pieces: GAE against a slow reference loop and hand-derived numbers, whitening, clipped value loss,
KL controllers."""

from __future__ import annotations

import pytest
import torch

from posttrain.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_value_loss,
    gae,
    kl_exceeds,
    token_surrogate,
    whiten,
)


def slow_gae(rewards, values, lengths, gamma, lam):
    out = []
    for r, v, n in zip(rewards.tolist(), values.tolist(), lengths):
        adv = [0.0] * len(r)
        for t in range(n):  # textbook definition: sum_l (gamma lam)^l delta_{t+l}
            total = 0.0
            for k in range(t, n):
                next_v = v[k + 1] if k + 1 < n else 0.0
                delta = r[k] + gamma * next_v - v[k]
                total += (gamma * lam) ** (k - t) * delta
            adv[t] = total
        out.append(adv)
    return torch.tensor(out, dtype=torch.float64)


def test_gae_equals_the_textbook_sum_with_ragged_lengths():
    g = torch.Generator().manual_seed(0)
    rewards, values = (
        torch.randn(4, 6, generator=g, dtype=torch.float64),
        torch.randn(4, 6, generator=g, dtype=torch.float64),
    )
    lengths = [6, 3, 1, 5]
    mask = torch.tensor([[t < n for t in range(6)] for n in lengths])
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)]:
        adv, ret = gae(rewards * mask, values, mask, gamma=gamma, lam=lam)
        expected = slow_gae(rewards * mask, values, lengths, gamma, lam)
        assert torch.allclose(adv, expected, atol=1e-12)
        assert torch.allclose(ret, (expected + values) * mask, atol=1e-12)


def test_gae_hand_derived():
    # r = [0, 1], V = [0.5, 0.2], gamma 0.9, lam 0.5: delta_1 = 1 - 0.2 = 0.8; delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32
    # A_1 = 0.8; A_0 = -0.32 + 0.45 * 0.8 = 0.04
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), gamma=0.9, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.04, 0.8])
    assert ret.tolist()[0] == pytest.approx([0.54, 1.0])


def test_whiten_ignores_masked_entries():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, False]])
    out = whiten(x, mask)
    assert out.tolist()[0] == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)
    assert whiten(x, mask, shift_mean=False).tolist()[0] == pytest.approx([1.0, 3.0, 0.0], abs=1e-5)


def test_clipped_value_loss_hand_derived():
    # V_old 0, V 1, R 2, clip 0.2: unclipped (1 - 2)^2 = 1; clipped V 0.2 -> (0.2 - 2)^2 = 3.24; max -> 0.5 * 3.24
    loss = clipped_value_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0]), torch.ones(1), clip=0.2)
    assert float(loss) == pytest.approx(1.62)
    # Moving towards the return inside the clip range is not penalised beyond the plain squared error.
    loss = clipped_value_loss(torch.tensor([0.1]), torch.tensor([0.0]), torch.tensor([2.0]), torch.ones(1), clip=0.2)
    assert float(loss) == pytest.approx(0.5 * 1.9**2)


def test_adaptive_kl_controller_moves_the_right_way():
    c = AdaptiveKLController(value=0.1, target=1.0, horizon=100)
    c.update(kl=3.0, n_steps=10)  # above target: error clipped to 0.2 -> 0.1 * (1 + 0.02)
    assert c.value == pytest.approx(0.102)
    c.update(kl=0.5, n_steps=10)  # below target: error -0.5 clipped to -0.2 -> down
    assert c.value == pytest.approx(0.102 * 0.98)
    before = c.value
    c.update(kl=1.0, n_steps=10)  # on target: unchanged
    assert c.value == before
    restored = AdaptiveKLController(value=0.0, target=0.0, horizon=1)
    restored.load_state_dict(c.state_dict())
    assert restored == c
    fixed = FixedKLController(0.05)
    fixed.update(kl=100.0, n_steps=1000)
    assert fixed.value == 0.05


def test_trust_region_check():
    assert kl_exceeds(0.03, 0.02) and not kl_exceeds(0.01, 0.02) and not kl_exceeds(1.0, 0.0)


def test_token_surrogate_hand_derived():
    import math

    old = torch.zeros(1, 3)
    logps = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]])  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[2.0, -1.0, 1.0]])
    mask = torch.tensor([[True, True, False]])
    loss = token_surrogate(logps, old, adv, mask, clip=0.2)
    # 1.5 * 2 = 3 vs clipped 1.2 * 2 = 2.4 -> min 2.4 -> -2.4; 0.5 * -1 = -0.5 vs 0.8 * -1 = -0.8 -> min -0.8 -> 0.8
    assert loss.tolist()[0] == pytest.approx([-2.4, 0.8, 0.0])
    grad = torch.autograd.grad(token_surrogate(logps.requires_grad_(), old, adv, mask, clip=0.2).sum(), logps)[0]
    assert grad.tolist()[0] == pytest.approx([0.0, 0.0, 0.0])  # both real tokens are clipped: no gradient
    ones = token_surrogate(
        torch.zeros(1, 2, requires_grad=True),
        torch.zeros(1, 2),
        torch.tensor([[1.0, -2.0]]),
        torch.ones(1, 2, dtype=torch.bool),
        clip=0.2,
    )
    assert ones.tolist()[0] == pytest.approx([-1.0, 2.0])  # ratio 1: the plain policy-gradient loss -A
