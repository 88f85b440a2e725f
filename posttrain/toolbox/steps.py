"""Toolbox steps in recipes: a stage of ``type: merge``, ``prune`` or ``quantize`` runs that tool on a model and
hands its output (a model directory, ``OUT/NAME``) to the next stage, which the evaluation suite then measures
like any trained stage.

The stage's keys are the tool function's keyword arguments (``posttrain.toolbox.merge.merge_models``,
``prune.prune_model``, ``quantize.quantize_model``); ``model`` defaults to the previous stage's result (merge takes
``models`` instead), and ``@NAME`` names an earlier stage's result, as in every recipe stage::

    - {name: w50, type: prune, model: "@grpo", method: wanda, sparsity: 0.5, calibration: "task:arithmetic"}
    - {name: wise, type: merge, method: slerp, models: ["@grpo", "@base"], t: 0.3}

    >>> step = tool_step({"name": "m", "type": "merge", "method": "linear", "models": ["a", "b"]},
    ...                  index=0, out=Path("runs/x"), previous_model=None)
    >>> step.kind, step.kwargs["out"]
    ('merge', 'runs/x/m')
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError

TOOLS = {
    "merge": "posttrain.toolbox.merge:merge_models",
    "prune": "posttrain.toolbox.prune:prune_model",
    "quantize": "posttrain.toolbox.quantize:quantize_model",
}


@dataclass(frozen=True)
class ToolStep:
    """One tool run of a recipe: the tool, its keyword arguments (``out`` included) and where its record lands."""

    kind: str
    kwargs: dict[str, Any]

    @property
    def out(self) -> str:
        return str(self.kwargs["out"])

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Run the tool (or, on ``resume``, reuse a finished output: the tool writes ``KIND.json`` last)."""
        record_file = Path(self.out) / f"{self.kind}.json"
        if resume and record_file.is_file() and (Path(self.out) / "config.json").is_file():
            return json.loads(record_file.read_text())
        return _function(self.kind)(**self.kwargs)


def _function(kind: str) -> Callable[..., dict[str, Any]]:
    module, _, name = TOOLS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def tool_step(
    stage: dict[str, Any],
    *,
    index: int,
    out: Path,
    previous_model: str | None,
    expand: Callable[[Any], Any] = lambda v: v,
) -> ToolStep:
    """The checked call of one tool stage: unknown keys and missing required ones are errors naming the key."""
    kind, name = stage["type"], stage["name"]
    where = f"stages[{index}]({name})"
    params = inspect.signature(_function(kind)).parameters
    values = {k: expand(v) for k, v in stage.items() if k not in ("name", "type")}
    model_param = next(iter(params))  # the tool's first argument: the model it works on (merge: its method)
    if model_param == "model_spec":
        model = values.pop("model", previous_model)
        if model is None:
            raise ConfigError(f"{where}.model: give the model to {kind} (no earlier stage to take it from)")
        values["model_spec"] = model
    elif "model" in values:
        raise ConfigError(f"{where}.model: {kind} takes models: [A, B, ...], not model")
    valid = sorted(p for p in params if p not in ("out", "model_spec"))
    for key in values:
        if key not in params or key == "out":
            raise ConfigError(f"{where}.{key}: unknown key for a {kind} stage (valid: {', '.join(valid)})")
    values["out"] = str(out / name)
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty and p.name not in values]
    if missing:
        raise ConfigError(f"{where}: a {kind} stage needs {', '.join(missing)}")
    return ToolStep(kind, values)
