"""Loading and calling reward functions, with errors that name the function and the prompt.

Built-ins and reward models (``rm:DIR``) are posttrain's own code and run in this process. A user's
``module:function`` must be a function the user's module defines (``posttrain.rewards.user`` says what is
refused and why) and runs in a worker process that a timeout can kill (``posttrain.rewards.sandbox``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from posttrain.errors import ConfigError, PosttrainError
from posttrain.rewards.builtin import BUILTIN_REWARDS, NEEDS_GOLD
from posttrain.rewards.sandbox import WorkerError, as_outcome, run_calls
from posttrain.rewards.user import TRUSTED_PACKAGES, resolve_user_function


class RewardError(PosttrainError):
    """A reward function raised, returned a non-number or NaN, or timed out."""


@dataclass(frozen=True)
class RewardSpec:
    name: str
    fn: Callable[..., Any]
    weight: float = 1.0


@dataclass(frozen=True)
class UserReward:
    """A user's ``module:function``, called in its worker process. ``fn`` is this process's copy, imported to
    check it at load time and read its signature and attributes; it is never called here."""

    spec: str
    module: str
    attr: str
    fn: Callable[..., Any]
    file: str | None

    @property
    def wants_prompt(self) -> bool:
        return bool(getattr(self.fn, "wants_prompt", False))

    def outcomes(
        self, calls: list[tuple[str, dict[str, Any]]], *, timeout_s: float, stop_at_failure: bool
    ) -> list[list[Any]]:
        """One outcome per ``(completion, kwargs)`` call (see ``posttrain.rewards.sandbox``)."""
        try:
            return run_calls(
                self.module,
                self.attr,
                calls,
                timeout_s=timeout_s,
                stop_at_failure=stop_at_failure,
                expected_file=self.file,
            )
        except WorkerError as err:
            raise RewardError(f"reward {self.spec!r}: cannot run it in a worker process: {err}") from None

    def __call__(self, completion: str, **kwargs: Any) -> float:
        """One call in the worker, at most 30 s; ``RewardError`` if it fails."""
        (outcome,) = self.outcomes([(completion, kwargs)], timeout_s=30.0, stop_at_failure=True)
        return _value(outcome, self.spec, {"prompt": kwargs.get("prompt", "")}, 30.0)


def load_reward(spec: str) -> Callable[..., Any]:
    """A built-in reward by name, ``rm:DIR`` (a reward model; ``rm:DIR1+DIR2`` an ensemble's mean), or a function
    of the user's own module, ``module:function``: imported (never ``eval``-ed) and run in a worker process.

    >>> load_reward("correct")("Answer: 4", answer=4)
    1.0
    >>> load_reward("os:system")
    Traceback (most recent call last):
    ...
    posttrain.errors.ConfigError: reward 'os:system': refused: 'os' is part of Python's standard library; a \
reward must be a function defined in your own module
    """
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
    module, attr, fn = resolve_user_function(spec)
    if module_name.partition(".")[0] in TRUSTED_PACKAGES:
        return fn
    return UserReward(spec, module_name, attr, fn, getattr(module, "__file__", None))


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
    """total (B,) weighted sum; per_function name -> (B,); failed: how many calls were scored 0 after an error;
    disagreement (B,): a reward-model ensemble's standard deviation per completion (the mean over ensembles when
    there are several), None without an ensemble."""

    total: Tensor
    per_function: dict[str, Tensor]
    failed: int = 0
    disagreement: Tensor | None = None


def _value(outcome: list[Any], name: str, row: dict[str, Any], timeout_s: float) -> float:
    """The score of one call from its outcome, or ``RewardError`` naming the function and the prompt."""
    kind = outcome[0]
    if kind == "ok" and math.isfinite(outcome[1]):
        return float(outcome[1])
    if kind == "ok":
        why = f"returned {outcome[1]}"
    elif kind == "type":
        why = f"returned {outcome[1]}, not a number,"
    elif kind == "raised":
        why = f"raised {outcome[1]}: {outcome[2]}"
    elif kind == "timeout":
        why = f"timed out after {timeout_s}s"
    else:  # "died"
        code = outcome[1]
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        why = f"stopped: its worker process died ({how})"
    raise RewardError(f"reward {name!r} {why} for prompt {_p(row)}")


def _p(row: dict[str, Any]) -> str:
    prompt = row.get("prompt", "")
    if isinstance(prompt, list):
        prompt = " | ".join(str(m.get("content", "")) for m in prompt)
    text = str(prompt)
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _call_here(fn: Callable[..., Any], completion: str, kwargs: dict[str, Any]) -> list[Any]:
    try:
        value = fn(completion, **kwargs)
    except Exception as err:  # noqa: BLE001 - report any failure with the function and prompt
        return ["raised", type(err).__name__, str(err)]
    return as_outcome(value)


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
    failed call 0 and counts it. A user function's call running longer than ``timeout_s`` is a failure too: its
    worker process is killed (and replaced for the next call). Built-ins and reward models run in this process.

    >>> specs = parse_rewards(["correct", "format"])
    >>> score_completions(specs, ["Answer: 4", "4"], [{"answer": "4"}, {"answer": "5"}]).total.tolist()
    [2.0, 0.0]
    """
    columns = [{k: v for k, v in row.items() if k not in ("prompt", "completion")} for row in rows]
    per_function: dict[str, list[float]] = {}
    spreads: list[list[float]] = []
    failed = 0
    for spec in specs:
        calls = [
            (completion, {**kwargs, "prompt": row.get("prompt")} if getattr(spec.fn, "wants_prompt", False) else kwargs)
            for completion, kwargs, row in zip(completions, columns, rows)
        ]
        if isinstance(spec.fn, UserReward):
            outcomes: Any = spec.fn.outcomes(calls, timeout_s=timeout_s, stop_at_failure=on_error != "zero")
        else:  # lazily: under "raise", nothing runs after the first failure
            outcomes = (_call_here(spec.fn, completion, kwargs) for completion, kwargs in calls)
        values = per_function.setdefault(spec.name, [])
        spread: list[float] = []
        ensemble = len(getattr(spec.fn, "models", ())) > 1
        for outcome, row in zip(outcomes, rows):
            try:
                values.append(_value(outcome, spec.name, row, timeout_s))
            except RewardError:
                if on_error != "zero":
                    raise
                failed += 1
                values.append(0.0)
            if ensemble:  # the reward models' spread on this call (0 for a failed one)
                spread.append(spec.fn.__dict__.pop("last_disagreement", 0.0))
        if spread:
            spreads.append(spread)
    tensors = {name: torch.tensor(values) for name, values in per_function.items()}
    total = sum(spec.weight * tensors[spec.name] for spec in specs)
    disagreement = torch.tensor(spreads).mean(0) if spreads else None
    return Scores(total=total, per_function=tensors, failed=failed, disagreement=disagreement)


def required_columns(fn: Callable[..., Any]) -> set[str]:
    """The row columns that reward ``fn`` cannot do without: ``answer`` for the built-ins that compare with the
    gold answer; for any other function, its parameters after the completion that have no default (``**kwargs``
    accepts any column and requires none).

    >>> required_columns(load_reward("correct")), required_columns(load_reward("format"))
    ({'answer'}, set())
    >>> def graded(completion, answer, *, level, hint=None, **row): ...
    >>> sorted(required_columns(graded))
    ['answer', 'level']
    """
    fn = fn.fn if isinstance(fn, UserReward) else fn
    if any(fn is BUILTIN_REWARDS[name] for name in NEEDS_GOLD):
        return {"answer"}
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read
        return set()
    kind = inspect.Parameter
    if parameters and parameters[0].kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD):
        parameters = parameters[1:]  # the completion
    named = (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)
    return {p.name for p in parameters if p.kind in named and p.default is kind.empty}


def check_reward_columns(
    specs: list[RewardSpec], rows: list[dict[str, Any]], source: str, *, lines: list[int] | None = None
) -> None:
    """``ConfigError`` if a reward needs a column (``required_columns``) that some of ``rows`` lack, naming the
    reward, the column, ``source`` and the first such row: its ``__line__``, else ``lines[i]``, else its
    position (1-based).

    >>> check_reward_columns(parse_rewards(["correct"]), [{"prompt": "2+2?"}], "task:sums", lines=[3])
    Traceback (most recent call last):
    ...
    posttrain.errors.ConfigError: reward 'correct' needs column 'answer', which rows of task:sums lack (1 of 1; \
first: line 3)
    """
    for spec in specs:
        wants_prompt = getattr(spec.fn, "wants_prompt", False)
        for column in sorted(required_columns(spec.fn)):
            if column == "prompt" and not wants_prompt:
                raise ConfigError(
                    f"reward {spec.name!r} takes a 'prompt' parameter, but a reward gets the row's columns other "
                    "than the prompt: give the parameter a default, or set wants_prompt = True on the function"
                )
            missing = [i for i, row in enumerate(rows) if column not in row and column != "prompt"]
            if missing:
                first = missing[0]
                line = rows[first].get("__line__", lines[first] if lines else None)
                where = f"line {line}" if line is not None else f"row {first + 1}"
                raise ConfigError(
                    f"reward {spec.name!r} needs column {column!r}, which rows of {source} lack "
                    f"({len(missing)} of {len(rows)}; first: {where})"
                )
