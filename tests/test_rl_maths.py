"""Advantage estimators, GRPO-family policy losses and KL estimators against hand-derived numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.advantages import (
    ESTIMATORS,
    centered_advantages,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    varied_groups,
)
from posttrain.losses.kl import kl_k1, kl_k3
from posttrain.losses.policy import POLICY_LOSSES, clipped_surrogate, sequence_ratio_surrogate


def test_group_advantages_hand_derived():
    # mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = 0.57735; 0.5 / 0.57735 = 0.866025
    out = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), eps=0.0)
    assert_close(out, torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025]]))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_zero_variance_group_and_group_of_one_give_zero_without_nan(name):
    est = ESTIMATORS[name]
    assert_close(est(torch.tensor([[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]])), torch.zeros(2, 3))
    assert_close(est(torch.tensor([[3.0], [1.0]])), torch.zeros(2, 1))


def test_centered_and_rloo_hand_derived():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    assert_close(centered_advantages(r), torch.tensor([[-1.0, 0.0, 1.0]]))
    # r_i - mean of the others: 1 - 2.5, 2 - 2, 3 - 1.5
    assert_close(rloo_advantages(r), torch.tensor([[-1.5, 0.0, 1.5]]))


def test_rloo_matches_leave_one_out_loop():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(4, 5, generator=g)
    slow = torch.empty_like(r)
    for n in range(4):
        for i in range(5):
            others = torch.cat([r[n, :i], r[n, i + 1 :]])
            slow[n, i] = r[n, i] - others.mean()
    assert_close(rloo_advantages(r), slow)


def test_reinforce_pp_uses_the_batch_std():
    # centred [[-1, 1], [0, 0]]; unbiased std over all four = sqrt(2/3)
    out = reinforce_pp_advantages(torch.tensor([[1.0, 3.0], [0.0, 0.0]]), eps=0.0)
    s = math.sqrt(2 / 3)
    assert_close(out, torch.tensor([[-1 / s, 1 / s], [0.0, 0.0]]))


def test_varied_groups():
    assert varied_groups(torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.5, 0.5]])).tolist() == [False, True, False]


def _token(ratio: float) -> torch.Tensor:
    return torch.tensor([[math.log(ratio)]])


@pytest.mark.parametrize(
    "ratio, adv, loss, clipped",
    [
        (1.5, 1.0, -1.2, True),  # min(1.5, 1.2) * 1
        (1.5, -1.0, 1.5, False),  # min(-1.5, -1.2) = -1.5
        (0.5, 1.0, -0.5, False),  # min(0.5, 0.8)
        (0.5, -1.0, 0.8, True),  # min(-0.5, -0.8) = -0.8
        (1.0, 2.0, -2.0, False),  # ratio 1: nothing clipped
    ],
)
def test_clipped_surrogate_hand_derived(ratio, adv, loss, clipped):
    mask = torch.ones(1, 1, dtype=torch.bool)
    losses, stats = clipped_surrogate(
        _token(ratio), torch.zeros(1, 1), torch.tensor([adv]), mask, eps_low=0.2, eps_high=0.2
    )
    assert_close(losses, torch.tensor([[loss]]))
    assert stats["clip_fraction"].item() == float(clipped)


def test_clip_higher_lets_a_rare_token_grow_further():
    mask = torch.ones(1, 1, dtype=torch.bool)
    args = (_token(1.25), torch.zeros(1, 1), torch.tensor([1.0]), mask)
    sym, _ = clipped_surrogate(*args, eps_low=0.2, eps_high=0.2)
    dapo, stats = clipped_surrogate(*args, eps_low=0.2, eps_high=0.28)
    assert_close(sym, torch.tensor([[-1.2]]))
    assert_close(dapo, torch.tensor([[-1.25]]))
    assert stats["clip_fraction"].item() == 0.0


def test_clipped_tokens_get_no_gradient():
    logps = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_()
    mask = torch.ones(1, 2, dtype=torch.bool)
    losses, _ = clipped_surrogate(logps, torch.zeros(1, 2), torch.tensor([1.0]), mask, eps_low=0.2, eps_high=0.2)
    losses.sum().backward()
    # token 0 is clipped (no gradient); token 1: d(-r)/dlogp = -r = -0.5
    assert_close(logps.grad, torch.tensor([[0.0, -0.5]]))


def test_masked_tokens_do_not_count():
    logps = torch.tensor([[0.0, 5.0]])
    mask = torch.tensor([[True, False]])
    losses, stats = clipped_surrogate(logps, torch.zeros(1, 2), torch.tensor([1.0]), mask, eps_low=0.2, eps_high=0.2)
    assert_close(losses, torch.tensor([[-1.0, 0.0]]))
    assert stats["clip_fraction"].item() == 0.0


def test_clipped_surrogate_matches_slow_loop():
    g = torch.Generator().manual_seed(3)
    logps, old = torch.randn(3, 4, generator=g) * 0.3, torch.randn(3, 4, generator=g) * 0.3
    adv = torch.randn(3, generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.2
    fast, _ = clipped_surrogate(logps, old, adv, mask, eps_low=0.1, eps_high=0.3)
    slow = torch.zeros(3, 4)
    for b in range(3):
        for t in range(4):
            if mask[b, t]:
                r = math.exp(logps[b, t] - old[b, t])
                slow[b, t] = -min(r * adv[b], min(max(r, 0.9), 1.3) * adv[b])
    assert_close(fast, slow)


def test_gspo_sequence_ratio_hand_derived():
    # log-ratio tokens 0.1 and 0.3 -> sequence ratio exp(0.2) = 1.2214, clipped to 1 + 4e-4 for A > 0
    logps = torch.tensor([[0.1, 0.3]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    losses, stats = sequence_ratio_surrogate(
        logps, torch.zeros(1, 2), torch.tensor([1.0]), mask, eps_low=3e-4, eps_high=4e-4
    )
    assert_close(losses, torch.full((1, 2), -1.0004))
    assert stats["clip_fraction"].item() == 1.0
    # Unclipped, the gradient of the sequence-mean loss is -s * A / T on every token (d s / d logp_t = s / T).
    logps.grad = None
    loss, _ = POLICY_LOSSES["gspo"](
        logps, torch.zeros(1, 2), torch.tensor([1.0]), mask, max_tokens=2, eps_low=10.0, eps_high=10.0
    )
    loss.backward()
    s = math.exp(0.2)
    assert_close(logps.grad, torch.tensor([[-s / 2, -s / 2]]))


def test_reductions_differ_as_documented():
    # Two sequences: lengths 2 and 1, ratio 1 everywhere, advantages 1 and -1 -> per-token losses [-1, -1], [1].
    logps = torch.zeros(2, 2)
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -1.0])
    grpo, _ = POLICY_LOSSES["grpo"](logps, logps, adv, mask, max_tokens=4)
    dapo, _ = POLICY_LOSSES["dapo"](logps, logps, adv, mask, max_tokens=4)
    dr, _ = POLICY_LOSSES["dr_grpo"](logps, logps, adv, mask, max_tokens=4)
    assert_close(grpo, torch.tensor(0.0))  # mean(-1, +1)
    assert_close(dapo, torch.tensor(-1 / 3))  # (-1 - 1 + 1) / 3 tokens
    assert_close(dr, torch.tensor(-1 / 8))  # (-1 - 1 + 1) / (2 sequences * 4)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_policy_losses_gradcheck(name):
    g = torch.Generator().manual_seed(1)
    old = (torch.randn(2, 3, generator=g, dtype=torch.float64) * 0.1).detach()
    logps = (old + torch.randn(2, 3, generator=g, dtype=torch.float64) * 0.05).requires_grad_()
    adv = torch.tensor([0.7, -1.2], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])

    def f(x):
        return POLICY_LOSSES[name](x, old, adv, mask, max_tokens=3, eps_low=0.5, eps_high=0.5)[0]

    assert torch.autograd.gradcheck(f, (logps,))


def test_kl_estimators_hand_derived():
    logps, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    assert_close(kl_k1(logps, ref), torch.tensor([[math.log(2)]]))
    # k3 = exp(ref - logp) - (ref - logp) - 1 = 0.5 + ln 2 - 1
    assert_close(kl_k3(logps, ref), torch.tensor([[0.5 + math.log(2) - 1]]))
    assert kl_k3(ref, logps).item() > 0  # always non-negative
