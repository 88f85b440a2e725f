"""Rewards API: built-ins, user functions by module:function, weights, and failures that name function and prompt."""

from __future__ import annotations

import sys
import time

import pytest

from posttrain.errors import ConfigError
from posttrain.rewards import RewardError, parse_rewards, score_completions
from posttrain.rewards.sandbox import shutdown_workers

ROWS = [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5", "level": 2}]


USER_MODULE = """
import time


def uses_columns(completion, answer, level):
    return float(level) * completion.strip().endswith(answer)


def boom(completion, **kw):
    return 1 / 0


def nan(completion, **kw):
    return float("nan")


def text(completion, **kw):
    return "high"


def slow(completion, **kw):
    time.sleep(2.0)
    return 1.0
"""


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """``my_rewards``: a user's reward module on sys.path (a real file: its functions run in a worker process)."""
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(tmp_path)
    sys.modules.pop("my_rewards", None)
    yield
    sys.modules.pop("my_rewards", None)
    shutdown_workers()


def test_builtins_and_weights():
    specs = parse_rewards(["correct", "correct_lenient", "format"], weights=[1.0, 0.5, 0.25])
    s = score_completions(specs, ["2+3=5\nAnswer: 5", "it is 5", "Answer: 6"], ROWS * 3)
    assert s.per_function["correct"].tolist() == [1.0, 0.0, 0.0]
    assert s.per_function["correct_lenient"].tolist() == [1.0, 1.0, 0.0]
    assert s.per_function["format"].tolist() == [1.0, 0.0, 1.0]
    assert s.total.tolist() == [1.75, 0.5, 0.25]


def test_user_function_gets_row_columns_by_name(user_module):
    s = score_completions(parse_rewards(["my_rewards:uses_columns"]), ["... 5"], ROWS)
    assert s.total.tolist() == [2.0]


@pytest.mark.parametrize(
    "name, words",
    [("boom", "raised ZeroDivisionError"), ("nan", "returned nan"), ("text", "returned str, not a number")],
)
def test_failures_name_function_and_prompt(user_module, name, words):
    with pytest.raises(RewardError) as err:
        score_completions(parse_rewards([f"my_rewards:{name}"]), ["x"], ROWS)
    assert f"'my_rewards:{name}'" in str(err.value) and words in str(err.value)
    assert "What is 2 + 3?" in str(err.value)


def test_on_error_zero_scores_and_counts(user_module):
    s = score_completions(parse_rewards(["my_rewards:boom", "correct"]), ["Answer: 5"], ROWS, on_error="zero")
    assert s.total.tolist() == [1.0] and s.failed == 1


def test_slow_reward_times_out(user_module):
    start = time.perf_counter()
    with pytest.raises(RewardError, match="timed out after 0.2s"):
        score_completions(parse_rewards(["my_rewards:slow"]), ["x"], ROWS, timeout_s=0.2)
    assert time.perf_counter() - start < 1.5


@pytest.mark.parametrize("spec", ["nope", "no_such_module:f", "os:no_such_function"])
def test_bad_specs_are_config_errors(spec):
    with pytest.raises(ConfigError):
        parse_rewards([spec])


def test_output_is_never_evaluated(user_module):
    # A completion that is valid Python scores by text matching only.
    s = score_completions(parse_rewards(["correct"]), ["Answer: __import__('os').getcwd()"], ROWS)
    assert s.total.tolist() == [0.0]
