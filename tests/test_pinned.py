"""Pinned tiny-model runs (SFT, GRPO, DPO, RM, PPO) must reproduce their golden curves (regenerate only with
scripts/regen_golden.py)."""

from __future__ import annotations

import json
import math

import pytest
from pinned import (
    GOLDEN,
    GRPO_GOLDEN,
    PREFERENCE_GOLDEN,
    pinned_grpo_curve,
    pinned_preference_curves,
    pinned_sft_losses,
)


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


def test_preference_trainers_match_golden():
    golden = json.loads(PREFERENCE_GOLDEN.read_text())
    curves = pinned_preference_curves()
    assert curves["dpo_loss"][0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    for key in ("dpo_loss", "dpo_margin", "rm_loss", "ppo_pg_loss"):
        assert curves[key] == pytest.approx(golden[key], rel=2e-3, abs=1e-6), key
    # PPO rewards come from sampled text: the same seed must give the same samples, hence the same scores.
    assert curves["ppo_score_mean"] == pytest.approx(golden["ppo_score_mean"], abs=1e-6)
