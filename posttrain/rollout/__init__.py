"""Rollout generation for RL, search and evaluation: one engine interface, chosen by name with ``make_engine``
(the built-in HF engine everywhere; vLLM as an optional extra on NVIDIA GPUs)."""

from posttrain.rollout.engine import HFEngine, RolloutEngine, Rollouts, SamplingParams
from posttrain.rollout.factory import ENGINES, engine_for, make_engine

__all__ = ["ENGINES", "HFEngine", "RolloutEngine", "Rollouts", "SamplingParams", "engine_for", "make_engine"]
