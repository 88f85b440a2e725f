"""Rollout generation for RL and search: one engine interface, the built-in HF engine behind it."""

from posttrain.rollout.engine import HFEngine, RolloutEngine, Rollouts, SamplingParams

__all__ = ["HFEngine", "RolloutEngine", "Rollouts", "SamplingParams"]
