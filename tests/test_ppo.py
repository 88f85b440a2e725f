"""PPO trainer: exact resume with the value head and the adaptive KL controller, trust-region stop, KL wiring."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import PPOConfig, build_config
from posttrain.train.ppo import run_ppo


def cfg(out, **kw):
    values = {
        "model": "builtin:tiny-base",
        "data": "task:arithmetic:val",
        "out": str(out),
        "max_steps": 4,
        "batch_prompts": 2,
        "samples_per_prompt": 2,
        "max_new_tokens": 16,
        "lr": 1e-3,
        "log_every": 1,
        "progress": False,
        "seed": 0,
        "reward": ["correct_lenient", "length_penalty"],
        "kl_coef": 0.1,
        "kl_controller": "adaptive",
        "kl_target": 0.5,
        "kl_horizon": 100,
    }
    return build_config(PPOConfig, {**values, **kw}, path="ppo")


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_twice_equals_uninterrupted_including_value_head_and_kl_controller(tmp_path):
    run_ppo(cfg(tmp_path / "full", save_every=1))
    run_ppo(cfg(tmp_path / "cut", save_every=1), stop_after=1)
    run_ppo(cfg(tmp_path / "cut", save_every=1, resume=True), stop_after=3)
    run_ppo(cfg(tmp_path / "cut", save_every=1, resume=True))
    for name in ("final/model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "step_s"} for r in rows]  # noqa: E731
    full = strip(metrics(tmp_path / "full"))
    assert full == strip(metrics(tmp_path / "cut"))
    coefs = [r["kl_coef"] for r in full]
    assert len(set(coefs)) > 1  # the adaptive controller moved, and its state survived the restarts


def test_kl_is_zero_at_the_first_step_and_coefficient_follows_the_controller(tmp_path):
    run_ppo(cfg(tmp_path / "run", max_steps=3, lr=3e-3))
    rows = metrics(tmp_path / "run")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference before any update
    for before, after in zip(rows, rows[1:]):
        # KL above the target raises the coefficient for the next step, below lowers it (clipped, horizon 100).
        error = max(min(before["kl"] / 0.5 - 1, 0.2), -0.2)
        assert after["kl_coef"] == pytest.approx(before["kl_coef"] * (1 + error * 4 / 100))


def test_trust_region_stops_the_updates(tmp_path):
    run_ppo(cfg(tmp_path / "tight", max_steps=2, lr=5e-2, ppo_epochs=4, trust_region_kl=1e-6, kl_coef=0.0))
    run_ppo(cfg(tmp_path / "loose", max_steps=2, lr=5e-2, ppo_epochs=4, kl_coef=0.0))
    tight, loose = metrics(tmp_path / "tight"), metrics(tmp_path / "loose")
    assert all(r["updates"] == 8 and not r["trust_region_stop"] for r in loose)  # 4 epochs x 2 minibatches
    assert any(r["trust_region_stop"] and 1 <= r["updates"] < 8 for r in tight)
