"""Loading and calling reward functions, with errors that name the function and the prompt."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from posttrain.errors import ConfigError, PosttrainError
from posttrain.rewards.builtin import BUILTIN_REWARDS


class RewardError(PosttrainError):
    """A reward function raised, returned a non-number or NaN, or timed out."""


@dataclass(frozen=True)
class RewardSpec:
    name: str
    fn: Callable[..., Any]
    weight: float = 1.0


def load_reward(spec: str) -> Callable[..., Any]:
    """A built-in reward by name, ``rm:DIR`` (a reward model; ``rm:DIR1+DIR2`` an ensemble's mean), or
    ``module:function`` imported (never ``eval``-ed)."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if spec.startswith("rm:"):
        from posttrain.rewards.model import RewardModelScorer

        return RewardModelScorer([p for p in spec[3:].split("+") if p])
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"reward {spec!r}: expected a built-in ({', '.join(sorted(BUILTIN_REWARDS))}) or module:function"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"reward {spec!r}: cannot import ({err})") from None
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: {attr} is not callable")
    return fn


def parse_rewards(specs: list[str], weights: list[float] | None = None) -> list[RewardSpec]:
    """Reward specs with weights (default 1 each); the lists must match in length."""
    if not specs:
        raise ConfigError("reward: give at least one reward function")
    weights = list(weights) if weights else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise ConfigError(f"reward_weights: {len(weights)} weights for {len(specs)} reward functions")
    return [RewardSpec(s, load_reward(s), float(w)) for s, w in zip(specs, weights)]


@dataclass
class Scores:
    """total (B,) weighted sum; per_function name -> (B,); failed: how many calls were scored 0 after an error."""

    total: Tensor
    per_function: dict[str, Tensor]
    failed: int = 0


def _check(value: Any, spec: RewardSpec, row: dict[str, Any]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RewardError(f"reward {spec.name!r} returned {type(value).__name__}, not a number, for prompt {_p(row)}")
    if not math.isfinite(value):
        raise RewardError(f"reward {spec.name!r} returned {value} for prompt {_p(row)}")
    return float(value)


def _p(row: dict[str, Any]) -> str:
    prompt = row.get("prompt", "")
    if isinstance(prompt, list):
        prompt = " | ".join(str(m.get("content", "")) for m in prompt)
    text = str(prompt)
    return repr(text if len(text) <= 80 else text[:77] + "...")


def score_completions(
    specs: list[RewardSpec],
    completions: list[str],
    rows: list[dict[str, Any]],
    *,
    timeout_s: float = 30.0,
    on_error: str = "raise",
) -> Scores:
    """Call every reward on every completion with its row's columns (``prompt`` and ``completion`` excluded;
    reward models, which declare ``wants_prompt``, also get the prompt).

    ``on_error="raise"`` stops with a ``RewardError`` naming the function and the prompt; ``"zero"`` scores the
    failed call 0 and counts it. A call running longer than ``timeout_s`` is a failure too."""
    per_function: dict[str, list[float]] = {s.name: [] for s in specs}
    failed = 0
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        for completion, row in zip(completions, rows):
            kwargs = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
            for spec in specs:
                try:
                    extra = {"prompt": row.get("prompt")} if getattr(spec.fn, "wants_prompt", False) else {}
                    future = pool.submit(spec.fn, completion, **kwargs, **extra)
                    try:
                        value = future.result(timeout=timeout_s)
                    except FutureTimeout:
                        # The stuck call keeps its thread; later calls get a fresh one.
                        pool.shutdown(wait=False, cancel_futures=True)
                        pool = ThreadPoolExecutor(max_workers=1)
                        raise RewardError(
                            f"reward {spec.name!r} timed out after {timeout_s}s for prompt {_p(row)}"
                        ) from None
                    except RewardError:
                        raise
                    except Exception as err:  # noqa: BLE001 - a user function may raise anything
                        raise RewardError(
                            f"reward {spec.name!r} raised {type(err).__name__}: {err} for prompt {_p(row)}"
                        ) from None
                    per_function[spec.name].append(_check(value, spec, row))
                except RewardError:
                    if on_error != "zero":
                        raise
                    failed += 1
                    per_function[spec.name].append(0.0)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    tensors = {name: torch.tensor(values) for name, values in per_function.items()}
    total = sum(spec.weight * tensors[spec.name] for spec in specs)
    return Scores(total=total, per_function=tensors, failed=failed)
