"""Rewards: one API for RL training, inference-time search and evaluation.

A reward function takes the completion text and the row's other columns as keyword arguments and returns a
number: ``fn(completion, *, answer=None, **row) -> float``. Built-ins are named (``correct``,
``correct_lenient``, ``format``, ``length_penalty``); user functions are given as ``module:function``: a
function that the user's own module defines (standard-library and installed third-party functions are
refused), run in a worker process so that a timeout can stop it.

    >>> specs = parse_rewards(["correct", "format"], weights=[1.0, 0.1])
    >>> scores = score_completions(specs, ["347+285\\nAnswer: 632"], [{"answer": "632"}])
    >>> scores.total.tolist(), scores.per_function["format"].tolist()
    ([1.100000023841858], [1.0])
"""

from posttrain.rewards.api import (
    RewardError,
    RewardSpec,
    Scores,
    UserReward,
    check_reward_columns,
    load_reward,
    parse_rewards,
    required_columns,
    score_completions,
)

__all__ = [
    "RewardError",
    "RewardSpec",
    "Scores",
    "UserReward",
    "check_reward_columns",
    "load_reward",
    "parse_rewards",
    "required_columns",
    "score_completions",
]
