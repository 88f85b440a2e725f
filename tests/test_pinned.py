"""A pinned tiny-model SFT run must reproduce its golden loss curve (regenerate only with scripts/regen_golden.py)."""

from __future__ import annotations

import json

import pytest
from pinned import GOLDEN, pinned_sft_losses


def test_sft_loss_curve_matches_golden():
    golden = json.loads(GOLDEN.read_text())["losses"]
    losses = pinned_sft_losses()
    assert len(losses) == len(golden) == 8
    # Tight enough that any change to masking, normalisation, packing or the optimiser shows; loose enough for
    # float differences between CPU kernels.
    assert losses == pytest.approx(golden, rel=2e-3)
    assert losses[-1] < losses[0]
