"""A pinned tiny-model SFT run must reproduce its golden loss curve (regenerate only with scripts/regen_golden.py)."""

from __future__ import annotations

import json

import pytest
from pinned import GOLDEN, GRPO_GOLDEN, pinned_grpo_curve, pinned_sft_losses


def test_sft_loss_curve_matches_golden():
    golden = json.loads(GOLDEN.read_text())["losses"]
    losses = pinned_sft_losses()
    assert len(losses) == len(golden) == 8
    # Tight enough that any change to masking, normalisation, packing or the optimiser shows; loose enough for
    # float differences between CPU kernels.
    assert losses == pytest.approx(golden, rel=2e-3)
    assert losses[-1] < losses[0]


def test_grpo_curve_matches_golden():
    golden = json.loads(GRPO_GOLDEN.read_text())
    curve = pinned_grpo_curve()
    # Rewards come from sampled text: the same seed must give the same samples, hence the same rewards.
    assert curve["reward_mean"] == pytest.approx(golden["reward_mean"], abs=1e-6)
    assert curve["grad_norm"] == pytest.approx(golden["grad_norm"], rel=1e-3)
