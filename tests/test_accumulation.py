"""Exact gradient accumulation, loss by loss: one batch of B rows equals B accumulated micro-batches of 1 (and an
uneven, strided split, as data-parallel ranks or the trainers' ``rows[i::grad_accum]`` chunks give) once every
reduction is handed the row and token counts of the whole optimiser step. Float64, ragged masks with a row of
one token; both the summed loss and the accumulated gradient w.r.t. the inputs must match the full batch's.

The full batch always uses the default counts (today's numbers); only the micro-batches are given whole-step
counts, so a reduction that ignored them would fail here.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from posttrain.losses import row_mean, sft_loss, token_mean
from posttrain.losses.kl import KL_ESTIMATORS
from posttrain.losses.policy import POLICY_LOSSES
from posttrain.losses.ppo import clipped_value_loss, token_surrogate, whiten, whiten_sums
from posttrain.losses.preference import PAIRED_LOSSES, bradley_terry_loss, kto_loss, kto_reference_point
from posttrain.losses.reduce import REDUCTIONS

LENGTHS = [7, 1, 4, 6, 2, 5]  # ragged, one row of a single token
B, T, MAX_TOKENS = len(LENGTHS), max(LENGTHS), 8
SINGLES = [[i] for i in range(B)]
SPLITS = {"micro_batches_of_1": SINGLES, "uneven_strided": [[0, 3, 5], [1], [2, 4]]}
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ragged_mask(lengths: list[int], t: int = T) -> torch.Tensor:
    return torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


MASK = ragged_mask(LENGTHS)
N_TOKENS = int(MASK.sum())


def accumulate(loss_of, inputs, parts, **counts):
    """Run ``loss_of(row_inputs, rows, **counts)`` on each part of the rows, backward each, like a trainer's
    micro-batches. Returns (summed loss, gradients accumulated on each input)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    total = torch.zeros((), dtype=torch.float64)
    for part in parts:
        rows = torch.tensor(part)
        loss = loss_of([x[rows] for x in leaves], rows, **counts)
        loss.backward()
        total += loss.detach()
    return total, [x.grad for x in leaves]


def assert_accumulation_exact(loss_of, inputs, parts, **counts):
    full_loss, full_grads = accumulate(loss_of, inputs, [list(range(B))])
    acc_loss, acc_grads = accumulate(loss_of, inputs, parts, **counts)
    assert all(g.abs().sum() > 0 for g in full_grads)  # the comparison is not vacuous
    assert_close(acc_loss, full_loss, **TIGHT)
    for acc, full in zip(acc_grads, full_grads):
        assert_close(acc, full, **TIGHT)


# --- SFT ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_sft_token_nll(split):
    v = 5
    logits = torch.randn(B, T, v, generator=gen(0), dtype=torch.float64)
    targets = torch.randint(0, v, (B, T), generator=gen(1))

    def loss_of(xs, rows, normaliser=None):
        losses, _ = sft_loss(xs[0], targets[rows], MASK[rows])
        return token_mean(losses, MASK[rows], normaliser=normaliser)

    assert_accumulation_exact(loss_of, [logits], SPLITS[split], normaliser=N_TOKENS)


# --- DPO family, KTO, Bradley-Terry ---------------------------------------------------------------------------


def preference_batch(seed: int):
    """Per-token policy log-probs (B, 2, T) for chosen/rejected (the differentiated input), frozen reference
    log-probs and ragged masks whose chosen and rejected lengths differ."""
    g = gen(seed)
    policy = -(torch.rand(B, 2, T, generator=g, dtype=torch.float64) * 2 + 0.05)
    reference = -(torch.rand(B, 2, T, generator=g, dtype=torch.float64) * 2 + 0.05)
    mask = torch.stack([MASK, ragged_mask([3, 5, 1, 7, 6, 2])], dim=1)
    return policy, reference, mask


def sequence_sums(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, token_logps, torch.zeros((), dtype=token_logps.dtype)).sum(-1)


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("name", sorted(PAIRED_LOSSES))
def test_paired_preference_losses(name, split):
    policy, reference, mask = preference_batch(2)

    def loss_of(xs, rows, num_rows=None):
        pol, ref, m = sequence_sums(xs[0], mask[rows]), sequence_sums(reference[rows], mask[rows]), mask[rows]
        lengths = m.sum(-1).to(torch.float64)
        losses, _ = PAIRED_LOSSES[name](
            pol[:, 0],
            pol[:, 1],
            ref[:, 0],
            ref[:, 1],
            beta=0.3,
            chosen_lengths=lengths[:, 0],
            rejected_lengths=lengths[:, 1],
        )
        return row_mean(losses, num_rows=num_rows)

    assert_accumulation_exact(loss_of, [policy], SPLITS[split], num_rows=B)


def kto_batch():
    policy, reference, mask = preference_batch(3)
    policy, reference, mask = policy[:, 0], reference[:, 0], mask[:, 0]
    # Shift the policy so that the per-row log-ratios have both signs and a positive mean: z = max(0, mean) > 0,
    # and a single row's own z = max(0, r_i) differs from it.
    policy = policy + torch.tensor([0.9, -0.4, 0.3, 0.6, -0.2, 0.5], dtype=torch.float64).unsqueeze(-1)
    desirable = torch.tensor([True, False, True, False, False, True])
    return policy, reference, mask, desirable


def kto_loss_of(reference, mask, desirable):
    def loss_of(xs, rows, num_rows=None, reference_point=None):
        pol, ref = sequence_sums(xs[0], mask[rows]), sequence_sums(reference[rows], mask[rows])
        losses, _ = kto_loss(
            pol, ref, desirable[rows], beta=0.5, undesirable_weight=1.3, reference_point=reference_point
        )
        return row_mean(losses, num_rows=num_rows)

    return loss_of


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_kto_with_the_whole_steps_reference_point(split):
    policy, reference, mask, desirable = kto_batch()
    z = kto_reference_point(sequence_sums(policy, mask), sequence_sums(reference, mask))
    assert float(z) > 0.1
    loss_of = kto_loss_of(reference, mask, desirable)
    assert_accumulation_exact(loss_of, [policy], SPLITS[split], num_rows=B, reference_point=z)


def test_kto_micro_batches_without_the_whole_steps_reference_point_differ():
    # Each micro-batch of 1 would estimate z from its own row: the accumulated loss is not the full batch's.
    policy, reference, mask, desirable = kto_batch()
    loss_of = kto_loss_of(reference, mask, desirable)
    full, _ = accumulate(loss_of, [policy], [list(range(B))])
    local, _ = accumulate(loss_of, [policy], SINGLES, num_rows=B)
    assert not torch.isclose(local, full, rtol=1e-3, atol=0)


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_bradley_terry(split):
    rewards = torch.randn(B, 2, generator=gen(4), dtype=torch.float64)  # one scalar reward per sequence
    margin = torch.rand(B, generator=gen(5), dtype=torch.float64)

    def loss_of(xs, rows, num_rows=None):
        return row_mean(bradley_terry_loss(xs[0][:, 0], xs[0][:, 1], margin[rows]), num_rows=num_rows)

    assert_accumulation_exact(loss_of, [rewards], SPLITS[split], num_rows=B)


# --- GRPO family and KL terms ---------------------------------------------------------------------------------


def policy_batch(seed: int):
    g = gen(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logps = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # ratios far enough from 1 to clip
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logps, old, ref, adv


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_policy_losses_with_kl_penalty(name, split):
    logps, old, ref, adv = policy_batch(6)
    policy = POLICY_LOSSES[name]
    eps = {"eps_low": 0.1, "eps_high": 0.15}  # GSPO's own range would clip every sequence at these ratios

    def loss_of(xs, rows, **counts):
        loss, stats = policy(xs[0], old[rows], adv[rows], MASK[rows], max_tokens=MAX_TOKENS, **counts, **eps)
        kl = KL_ESTIMATORS["k3"](xs[0], ref[rows])
        return loss + 0.05 * policy.reduce(kl, MASK[rows], max_tokens=MAX_TOKENS, **counts)

    _, stats = policy(logps, old, adv, MASK, max_tokens=MAX_TOKENS, **eps)
    assert 0 < float(stats["clip_fraction"]) < 1  # both branches of the clip are exercised
    assert_accumulation_exact(loss_of, [logps], SPLITS[split], num_rows=B, num_tokens=N_TOKENS)


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("reduction", sorted(REDUCTIONS))
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_terms_under_each_reduction(estimator, reduction, split):
    logps, _, ref, _ = policy_batch(7)

    def loss_of(xs, rows, **counts):
        kl = KL_ESTIMATORS[estimator](xs[0], ref[rows])
        return REDUCTIONS[reduction](kl, MASK[rows], max_tokens=MAX_TOKENS, **counts)

    assert_accumulation_exact(loss_of, [logps], SPLITS[split], num_rows=B, num_tokens=N_TOKENS)


def test_dapo_row_weighted_micro_batches_were_wrong_and_whole_step_counts_are_exact():
    # The old trainer: each micro-batch's DAPO loss is its own token mean, weighted by its share of the rows. On
    # ragged lengths that weights sequences, not tokens: a one-token row counts as much as a seven-token row.
    logps, old, _, adv = policy_batch(8)
    dapo = POLICY_LOSSES["dapo"]

    def old_way(xs, rows):
        return dapo(xs[0], old[rows], adv[rows], MASK[rows], max_tokens=MAX_TOKENS)[0] * (len(rows) / B)

    def new_way(xs, rows):
        return dapo(xs[0], old[rows], adv[rows], MASK[rows], max_tokens=MAX_TOKENS, num_tokens=N_TOKENS)[0]

    full, full_grad = accumulate(old_way, [logps], [list(range(B))])
    before, before_grad = accumulate(old_way, [logps], SINGLES)
    after, after_grad = accumulate(new_way, [logps], SINGLES)
    assert not torch.isclose(before, full, rtol=1e-2, atol=0)
    assert not torch.allclose(before_grad[0], full_grad[0], rtol=1e-2, atol=0)
    assert_close(after, full, **TIGHT)
    assert_close(after_grad[0], full_grad[0], **TIGHT)


@pytest.mark.parametrize("reduction", sorted(REDUCTIONS))
def test_whole_step_counts_equal_to_the_batch_reproduce_the_defaults(reduction):
    logps, _, ref, _ = policy_batch(9)
    kl = KL_ESTIMATORS["k3"](logps, ref)
    default = REDUCTIONS[reduction](kl, MASK, max_tokens=MAX_TOKENS)
    explicit = REDUCTIONS[reduction](kl, MASK, max_tokens=MAX_TOKENS, num_rows=B, num_tokens=N_TOKENS)
    assert_close(explicit, default, **TIGHT)


# --- PPO ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_ppo_token_surrogate_and_clipped_value_loss(split):
    g = gen(10)
    old_logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logps = old_logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    advantages = whiten(torch.randn(B, T, generator=g, dtype=torch.float64), MASK)
    old_values = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = old_values + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    returns = torch.randn(B, T, generator=g, dtype=torch.float64)

    def loss_of(xs, rows, normaliser=None):
        m = MASK[rows]
        pg = token_surrogate(xs[0], old_logps[rows], advantages[rows], m, clip=0.2)
        vf = clipped_value_loss(xs[1], old_values[rows], returns[rows], m, clip=0.2)
        return token_mean(pg, m, normaliser=normaliser) + 0.5 * token_mean(vf, m, normaliser=normaliser)

    assert_accumulation_exact(loss_of, [logps, values], SPLITS[split], normaliser=N_TOKENS)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_with_partial_sums_summed_over_ranks_equals_whitening_the_whole_batch(shift_mean):
    x = torch.randn(B, T, generator=gen(11), dtype=torch.float64) * 2 + 0.7
    ranks = SPLITS["uneven_strided"]
    stats = sum(whiten_sums(x[r], MASK[r]) for r in ranks)  # what one all-reduce of each rank's sums gives
    whole = whiten(x, MASK, shift_mean=shift_mean)
    for r in ranks:
        assert_close(whiten(x[r], MASK[r], shift_mean=shift_mean, stats=stats), whole[r], **TIGHT)
    # Each rank whitening its own rows (the default) would not give the whole batch's numbers.
    assert not torch.allclose(whiten(x[ranks[1]], MASK[ranks[1]], shift_mean=shift_mean), whole[ranks[1]])


def test_whiten_sums_hand_derived():
    x = torch.tensor([[1.0, 2.0, 50.0], [3.0, 60.0, 70.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert_close(whiten_sums(x, mask), torch.tensor([6.0, 14.0, 3.0]))  # 1 + 2 + 3, 1 + 4 + 9, three entries
    # mean 2, var 14 / 3 - 4 = 2 / 3: the stats path and the two-pass default agree.
    expected = torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]) / (2 / 3) ** 0.5
    assert_close(whiten(x, mask, stats=whiten_sums(x, mask)), expected)
    assert_close(whiten(x, mask), expected)
