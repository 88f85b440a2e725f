"""The one registry of training stages, read by the CLI (sub-commands and their flags), recipes (stage types)
and the report (each stage's own curves). Runners are named ``module:function`` and imported only when run,
so listing stages imports no torch.

    >>> sorted(STAGES)
    ['distill', 'dpo', 'grpo', 'ppo', 'pretrain', 'rm', 'sft']
    >>> STAGES["rm"].policy        # a reward model is not the next stage's policy
    False
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.config import DistillConfig, DPOConfig, GRPOConfig, PPOConfig, PretrainConfig, RMConfig, SFTConfig

Series = list[tuple[str, str, str]]  # (metric key, label, matplotlib style)


@dataclass(frozen=True)
class StageInfo:
    """A training stage: its config class, one-line description, runner, whether its result is a policy (the
    next recipe stage's model), what the CLI prints when it ends, and the curves its report section plots."""

    name: str
    config: type
    description: str
    runner: str
    policy: bool = True
    prints: tuple[str, ...] = ("final", "steps", "final_train_loss", "heldout", "wall_s")
    curves: tuple[str, Series] | None = None

    def run(self, cfg: Any, **kwargs: Any) -> dict[str, Any]:
        """Import the runner and run the stage with ``cfg``; returns its summary."""
        module, _, function = self.runner.partition(":")
        fn: Callable[..., dict[str, Any]] = getattr(importlib.import_module(module), function)
        return fn(cfg, **kwargs)


_RL_CURVES: Series = [
    ("reward_mean", "reward (samples)", "-"),
    ("accuracy_strict", "strict accuracy (samples)", ":"),
    ("eval_accuracy_strict", "held-out greedy accuracy", "o-"),
]

STAGES: dict[str, StageInfo] = {
    s.name: s
    for s in [
        StageInfo(
            "pretrain",
            PretrainConfig,
            "train a causal LM on text rows (from scratch with --model builtin:tiny)",
            "posttrain.train.sft:run_pretrain",
        ),
        StageInfo(
            "sft", SFTConfig, "supervised fine-tuning, full or LoRA (--lora-rank R)", "posttrain.train.sft:run_sft"
        ),
        StageInfo(
            "grpo",
            GRPOConfig,
            "RL with verifiable rewards: GRPO, Dr. GRPO, DAPO, GSPO (--loss), RLOO/REINFORCE++ (--advantage)",
            "posttrain.train.grpo:run_grpo",
            prints=("final", "steps", "final_reward_mean", "heldout", "wall_s"),
            curves=("reward and accuracy", _RL_CURVES),
        ),
        StageInfo(
            "dpo",
            DPOConfig,
            "preference optimisation: DPO, cDPO, IPO, SimPO, ORPO on pairs; KTO on unpaired rows (--loss)",
            "posttrain.train.dpo:run_dpo",
            curves=(
                "implicit reward margin and preference accuracy",
                [
                    ("margin", "reward margin (chosen - rejected, batch)", "-"),
                    ("accuracy", "preference accuracy (batch)", ":"),
                    ("eval_preference_accuracy", "held-out preference accuracy", "o-"),
                ],
            ),
        ),
        StageInfo(
            "rm",
            RMConfig,
            "reward model: Bradley-Terry on a scalar head, saved for AutoModelForSequenceClassification",
            "posttrain.train.rm:run_rm",
            policy=False,
            curves=(
                "pair accuracy",
                [("accuracy", "pair accuracy (batch)", ":"), ("eval_pair_accuracy", "held-out pair accuracy", "o-")],
            ),
        ),
        StageInfo(
            "ppo",
            PPOConfig,
            "PPO: value head, GAE, KL penalty (fixed or adaptive) and an optional KL trust region",
            "posttrain.train.ppo:run_ppo",
            prints=("final", "steps", "final_score_mean", "kl_coef", "heldout", "wall_s"),
            curves=(
                "score, KL and accuracy",
                [
                    ("score_mean", "score (reward function / model)", "-"),
                    ("kl", "KL to the reference (per sequence)", "--"),
                    ("accuracy_strict", "strict accuracy of samples", ":"),
                    ("eval_accuracy_strict", "held-out greedy accuracy", "o-"),
                ],
            ),
        ),
        StageInfo(
            "distill",
            DistillConfig,
            "distillation from --teacher: forward/reverse KL or generalised JSD, off- or on-policy (GKD)",
            "posttrain.train.distill:run_distill",
            curves=(
                "divergence to the teacher and held-out loss",
                [("loss", "divergence to the teacher (batch)", "-"), ("eval_loss", "held-out NLL", "o-")],
            ),
        ),
    ]
}
