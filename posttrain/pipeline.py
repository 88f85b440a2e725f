"""Recipes: stages in order, each reading the previous stage's artifact, with one evaluation suite measured
on the starting model and after every stage (held-out accuracy, retention, perplexity).

The suite reports the first task's strict, lenient and fair accuracy (``accuracy``, ``accuracy_lenient``,
``accuracy_fair``), the other tasks' strict and fair accuracy as retention (``retention``, ``retention_fair`` and
their means ``retention_accuracy``, ``retention_accuracy_fair``), and perplexity on ``perplexity_data``: by
default ``text:general``, ordinary English prose (``posttrain.tasks.text``), the fair choice for a real model;
the tiny model's recipes measure ``corpus:val``, its own pretraining text; ``""`` measures none.

A recipe is YAML::

    out: runs/demo
    evaluate: {tasks: [arithmetic, uppercase], perplexity_data: "corpus:val", limit: 300}
    stages:
      - {name: pretrain, use: builtin:tiny-base}     # a shipped artifact stands in for the stage
      - {name: sft, lr: 0.002, max_steps: 300}        # model defaults to the previous stage's final/

    >>> recipe = load_recipe(QUICKSTART)
    >>> [s["name"] for s in recipe["stages"]]
    ['pretrain', 'sft', 'grpo']
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from posttrain.config import EvalConfig, build_config, coerce
from posttrain.errors import ConfigError, PosttrainError
from posttrain.rundir import check_run_dir, claim, write_atomic
from posttrain.stages import STAGES
from posttrain.tasks.text import is_text_source, text_rows
from posttrain.toolbox.steps import TOOLS, tool_step

RECIPES = Path(__file__).resolve().parent / "recipes"
QUICKSTART = RECIPES / "quickstart.yaml"
TOP_KEYS = {"name", "out", "evaluate", "stages", "description", "search"}
SUITE_KEYS = {"tasks", "perplexity_data", "limit", "max_new_tokens", "batch_size"}
DEFAULT_PERPLEXITY = "text:general"  # the suite's perplexity set when a recipe names none


def load_recipe(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a recipe and apply ``--set`` overrides (``stage_name.key=value``, ``evaluate.key=value``, ``out=DIR``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe file")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list) or not recipe["stages"]:
        raise ConfigError(f"{path}: a recipe needs a non-empty 'stages' list")
    for key in recipe:
        if key not in TOP_KEYS:
            raise ConfigError(f"{path}: {key}: unknown key (valid: {', '.join(sorted(TOP_KEYS))})")
    names = []
    for i, stage in enumerate(recipe["stages"]):
        if not isinstance(stage, dict) or "name" not in stage:
            raise ConfigError(f"{path}: stages[{i}]: each stage needs a name")
        names.append(stage["name"])
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item}: expected key=value")
        target, _, field = key.partition(".")
        parsed = yaml.safe_load(value) if value else ""
        if target == "out" and not field:
            recipe["out"] = value
        elif target == "evaluate" and field in SUITE_KEYS:
            recipe.setdefault("evaluate", {})[field] = parsed
        elif target in names and field:
            recipe["stages"][names.index(target)][field] = value if isinstance(parsed, (dict, list)) else parsed
        else:
            raise ConfigError(f"--set {key}: no such stage or key (stages: {', '.join(names)}; or evaluate.KEY, out)")
    return recipe


def stage_config(
    stage: dict[str, Any],
    *,
    index: int,
    out: Path,
    previous_model: str | None,
    artifacts: dict[str, str] | None = None,
) -> tuple[str, Any]:
    """(type, config) of one recipe stage; ``model`` defaults to the previous policy stage's result, and
    ``@NAME`` in a value stands for stage NAME's result (e.g. ``reward: [rm:@rm]`` for a reward model)."""
    expand = _expander(artifacts or {})
    values = {k: expand(v) for k, v in stage.items() if k not in ("name", "type", "use")}
    kind = stage.get("type", stage["name"])
    if kind not in STAGES:
        choices = ", ".join([*STAGES, *TOOLS])
        raise ConfigError(f"stages[{index}].type: unknown stage type {kind!r} (choose one of {choices})")
    values.setdefault("out", str(out / stage["name"]))
    if previous_model is not None:
        values.setdefault("model", previous_model)
    return kind, build_config(STAGES[kind].config, values, path=f"stages[{index}]({stage['name']})")


def _expander(artifacts: dict[str, str]) -> Any:
    """``@NAME`` in a value (a string or a list of them) -> stage NAME's result."""

    def expand(value: Any) -> Any:
        if isinstance(value, list):
            return [expand(v) for v in value]
        if isinstance(value, str) and "@" in value:
            for name, path in sorted(artifacts.items(), key=lambda item: -len(item[0])):  # @sft_only before @sft
                value = value.replace(f"@{name}", path)
        return value

    return expand


def suite_perplexity_source(recipe: dict[str, Any]) -> str:
    """The text the suite measures perplexity on: the recipe's ``evaluate.perplexity_data``, else
    ``DEFAULT_PERPLEXITY``; an empty value (or none) measures none. A shipped text set is checked here, at load
    time.

    >>> suite_perplexity_source({}), suite_perplexity_source({"evaluate": {"perplexity_data": "corpus:val"}})
    ('text:general', 'corpus:val')
    """
    source = (recipe.get("evaluate") or {}).get("perplexity_data", DEFAULT_PERPLEXITY)
    source = coerce("" if source is None else source, str, "evaluate.perplexity_data")
    if source and is_text_source(source):
        try:
            text_rows(source)
        except ConfigError as err:
            raise ConfigError(f"evaluate.perplexity_data: {err}") from None
    return source


def suite_configs(recipe: dict[str, Any]) -> list[EvalConfig]:
    suite = recipe.get("evaluate") or {}
    for key in suite:
        if key not in SUITE_KEYS:
            raise ConfigError(f"evaluate.{key}: unknown key (valid: {', '.join(sorted(SUITE_KEYS))})")
    suite_perplexity_source(recipe)
    tasks = coerce(suite.get("tasks", []), list[str], "evaluate.tasks")
    common = {k: suite[k] for k in ("limit", "max_new_tokens", "batch_size") if k in suite}
    return [build_config(EvalConfig, {"task": t, **common}, path="evaluate") for t in tasks]


def run_suite(model_spec: str, recipe: dict[str, Any], *, progress: bool = True) -> dict[str, Any]:
    """The recipe's evaluation suite on one model: the first task is the target, the others measure retention
    (strict and fair); perplexity on ``suite_perplexity_source``."""
    from posttrain.distributed import resolve_device
    from posttrain.eval.harness import evaluate_model, perplexity
    from posttrain.models.loading import load_model, parameter_count, weights_on_disk

    model, tokenizer = load_model(model_spec)
    model.to(resolve_device("auto"))
    out: dict[str, Any] = {"tasks": {}, "params": parameter_count(model)}
    out["size_mb"] = weights_on_disk(model_spec) / 2**20
    for i, cfg in enumerate(suite_configs(recipe)):
        result = evaluate_model(model, tokenizer, replace(cfg, progress=progress))
        keys = ("accuracy", "accuracy_strict", "accuracy_lenient", "accuracy_fair", "rows", "tokens_per_question")
        out["tasks"][cfg.task] = {k: result[k] for k in keys}
        if i == 0:
            out.update(
                accuracy=result["accuracy_strict"],
                accuracy_lenient=result["accuracy_lenient"],
                accuracy_fair=result["accuracy_fair"],
                # greedy generation speed on the target task (batched, as the suite runs it; scoring included)
                tokens_per_s=result["tokens_per_question"] * result["rows"] / max(result["wall_s"], 1e-9),
            )
        else:
            out.setdefault("retention", {})[cfg.task] = result["accuracy_strict"]
            out.setdefault("retention_fair", {})[cfg.task] = result["accuracy_fair"]
    if out.get("retention"):
        out["retention_accuracy"] = sum(out["retention"].values()) / len(out["retention"])
        out["retention_accuracy_fair"] = sum(out["retention_fair"].values()) / len(out["retention_fair"])
    source = suite_perplexity_source(recipe)
    if source:
        out["perplexity"] = perplexity(model, tokenizer, source)
        out["perplexity_data"] = source
    return out


def search_configs(recipe: dict[str, Any]) -> list[EvalConfig]:
    """The recipe's ``search`` section as eval configs: one per strategy entry, on the first suite task."""
    section = recipe.get("search")
    if not section:
        return []
    if not isinstance(section, dict) or not isinstance(section.get("strategies"), list):
        raise ConfigError("search: expected {limit, max_new_tokens, temperature, strategies: [{strategy, ...}]}")
    tasks = coerce((recipe.get("evaluate") or {}).get("tasks", []), list[str], "evaluate.tasks")
    if not tasks:
        raise ConfigError("search: needs evaluate.tasks (the first task is searched)")
    common = {k: v for k, v in section.items() if k != "strategies"}
    return [
        build_config(EvalConfig, {"task": tasks[0], **common, **entry}, path=f"search.strategies[{i}]")
        for i, entry in enumerate(section["strategies"])
    ]


def run_search_suite(model_spec: str, recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """Every strategy of the recipe's ``search`` section on the final model: one point per (strategy, n)."""
    from posttrain.distributed import resolve_device
    from posttrain.eval.harness import evaluate_search
    from posttrain.models.loading import load_model

    configs = search_configs(recipe)
    if not configs:
        return []
    model, tokenizer = load_model(model_spec)
    model.to(resolve_device("auto"))
    points = []
    for cfg in configs:
        result = evaluate_search(model, tokenizer, cfg)
        points += result.get("scaling") or [{k: v for k, v in result.items() if k not in ("source", "examples")}]
    return points


STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _check_stage_names(stages: list[dict[str, Any]]) -> None:
    """Stage names become directories under the run directory: plain names only, each once."""
    seen: set[str] = set()
    for i, stage in enumerate(stages):
        name = stage["name"]
        if not isinstance(name, str) or not STAGE_NAME.match(name) or name in (".", ".."):
            raise ConfigError(
                f"stages[{i}].name: {name!r} is not a plain name (letters, digits, '_', '-', '.'; it names the"
                " stage's directory inside the run directory)"
            )
        if name in seen:
            raise ConfigError(f"stages[{i}].name: {name!r} is used twice (each stage writes to OUT/NAME)")
        if "out" in stage:
            raise ConfigError(
                f"stages[{i}]({name}).out: a recipe stage writes to its run directory's {name}/; rename the stage"
                " instead"
            )
        seen.add(name)


def _data_kinds(kind: str, cfg: Any) -> dict[str, str]:
    """Config key -> row kind of every data source a stage reads."""
    if kind in ("pretrain", "sft", "distill"):
        row = "text" if kind == "pretrain" else "sft"
        return {"data": row, "eval_data": row, "replay_data": "sft"}
    if kind == "dpo":
        return {k: "unpaired" if cfg.loss == "kto" else "preference" for k in ("data", "eval_data")}
    if kind == "rm":
        return {"data": "preference", "eval_data": "preference"}
    return {"data": "prompt", "eval_data": "prompt"}


def _check_sources(kind: str, cfg: Any, produced: set[str]) -> None:
    """Every data source of a stage exists and its rows are valid (a later stage's input that an earlier stage
    produces is checked when that stage runs)."""
    from posttrain.data.rows import load_rows, validate_rows

    for key, rows_kind in _data_kinds(kind, cfg).items():
        source = getattr(cfg, key, "")
        if not source or any(source.startswith(p) for p in produced):
            continue
        checked = validate_rows(
            load_rows(source), rows_kind, source=source, skip_bad_rows=getattr(cfg, "skip_bad_rows", False)
        )
        if key == "data" and kind in ("grpo", "ppo"):  # rewards that need a column the rows lack
            from posttrain.rewards import check_reward_columns, parse_rewards

            named = [s for s in cfg.reward if not s.startswith("rm:")]  # reward models are loaded when they run
            if named:
                check_reward_columns(parse_rewards(named), checked.rows, source, lines=checked.lines)


def _check_models_and_rewards(cfg: Any, produced: set[str]) -> None:
    from posttrain.models.loading import resolve
    from posttrain.rewards.api import load_reward

    for model in (cfg.model, getattr(cfg, "teacher", "")):
        if model and model not in produced:
            resolve(model)
    for spec in getattr(cfg, "reward", []):
        if spec.startswith("rm:"):
            for path in (p for p in spec[3:].split("+") if p and p not in produced):
                resolve(path)
        else:
            load_reward(spec)


def plan_recipe(
    recipe: dict[str, Any], run_dir: Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> list[tuple[dict[str, Any], str | None, Any]]:
    """The whole recipe validated before anything trains: every stage's name, keys and values, data sources,
    models, reward functions and run directory, and the evaluation and search settings. Returns per stage (entry,
    type, config), with type None and the model path for a ``use`` stage."""
    from posttrain.models.loading import resolve

    _check_stage_names(recipe["stages"])
    suite_configs(recipe)
    search_configs(recipe)
    check_run_dir(run_dir, key="run.out", resume=resume, overwrite=overwrite)
    plan: list[tuple[dict[str, Any], str | None, Any]] = []
    previous: str | None = None
    artifacts: dict[str, str] = {}
    for index, stage in enumerate(recipe["stages"]):
        if "use" in stage:
            try:
                previous = resolve(str(stage["use"]))
            except PosttrainError as err:
                raise ConfigError(f"stages[{index}]({stage['name']}).use: {err}") from None
            artifacts[stage["name"]] = previous  # later stages may name it: teacher: "@teacher"
            plan.append((stage, None, previous))
            continue
        if stage.get("type") in TOOLS:  # merge / prune: a tool's output is the next stage's model
            step = tool_step(stage, index=index, out=run_dir, previous_model=previous, expand=_expander(artifacts))
            artifacts[stage["name"]] = previous = step.out
            plan.append((stage, "tool", step))
            continue
        kind, cfg = stage_config(stage, index=index, out=run_dir, previous_model=previous, artifacts=artifacts)
        cfg = replace(
            cfg, progress=progress and cfg.progress, resume=cfg.resume or resume, overwrite=cfg.overwrite or overwrite
        )
        where = f"stages[{index}]({stage['name']})"
        check_run_dir(cfg.out, key=f"{where}.out", resume=cfg.resume, overwrite=cfg.overwrite)
        produced = set(artifacts.values())
        try:
            _check_sources(kind, cfg, produced)
            _check_models_and_rewards(cfg, produced)
        except PosttrainError as err:  # a data, model or reward error: say which stage it belongs to
            raise ConfigError(f"{where}: {err}") from None
        final = str(Path(cfg.out) / "final")
        artifacts[stage["name"]] = final
        if STAGES[kind].policy:
            previous = final
        plan.append((stage, kind, cfg))
    return plan


def run_recipe(
    recipe: dict[str, Any],
    *,
    out: str | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run every stage, evaluate after each, write ``summary.json`` and ``report.html`` in the run directory.
    The whole recipe is checked first (:func:`plan_recipe`); ``resume`` continues every stage from its newest
    checkpoint, ``overwrite`` replaces a previous run in the same directory."""
    from posttrain.report import print_stage_table, write_report

    run_dir = Path(out or recipe.get("out") or "runs/recipe")
    plan = plan_recipe(recipe, run_dir, resume=resume, overwrite=overwrite, progress=progress)
    claimed = claim(run_dir, key="run.out", resume=resume, overwrite=overwrite)
    try:
        write_atomic(run_dir / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
        return _run_plan(recipe, plan, run_dir, print_stage_table, write_report, progress, resume=resume)
    finally:
        claimed.release()


def _run_plan(
    recipe: dict[str, Any],
    plan: list,
    run_dir: Path,
    print_stage_table: Any,
    write_report: Any,
    progress: bool,
    *,
    resume: bool = False,
) -> dict:
    started = time.perf_counter()
    stages: list[dict[str, Any]] = []
    previous: str | None = None
    for stage, kind, cfg in plan:
        t0 = time.perf_counter()
        if kind == "tool":
            record = {
                "name": stage["name"],
                "source": cfg.kind,
                "type": cfg.kind,
                "model": cfg.out,
                "tool": cfg.run(resume=resume),
            }
            previous = cfg.out
        elif kind is None:
            previous = cfg
            provenance = Path(previous) / "PROVENANCE.json"
            record = {
                "name": stage["name"],
                "source": "shipped",
                "model": previous,
                "provenance": json.loads(provenance.read_text()) if provenance.exists() else None,
            }
        else:
            summary = STAGES[kind].run(cfg)
            if STAGES[kind].policy:  # a reward model is not the next policy: later stages refer to it as @NAME
                previous = summary["final"]
            record = {
                "name": stage["name"],
                "source": "trained",
                "type": kind,
                "model": summary["final"],
                "train": summary,
                "run_dir": cfg.out,
            }
        record["train_wall_s"] = time.perf_counter() - t0
        if record.get("type") == "rm":
            record["eval"] = {"pair_accuracy": record["train"]["heldout"]["pair_accuracy"]}
        else:
            record["eval"] = run_suite(previous, recipe, progress=progress)
        record["wall_s"] = time.perf_counter() - t0
        stages.append(record)
        print_stage_table(stages)
    t0 = time.perf_counter()
    search_points = run_search_suite(previous, recipe) if previous else []
    if search_points:
        from posttrain.report import print_search_table

        print_search_table(search_points)
    summary = {
        "recipe": recipe.get("name", ""),
        "stages": stages,
        **({"search": search_points, "search_wall_s": time.perf_counter() - t0} if search_points else {}),
        "wall_s": time.perf_counter() - started,
        "final_model": previous,
    }
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    write_report(run_dir, summary)
    return summary


def run_demo(
    *,
    out: str = "runs/demo",
    from_scratch: bool = False,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """The quickstart: (shipped or fresh) pretrained tiny base -> SFT -> evaluation, all on the embedded default.

    ``from_scratch`` replaces the shipped base by a pretraining run with the settings that produced it."""
    recipe = load_recipe(QUICKSTART)
    if from_scratch:
        shipped = yaml.safe_load((RECIPES / "tiny_base.yaml").read_text())
        recipe["stages"][0] = {"name": "pretrain", **shipped}
    return run_recipe(recipe, out=out, progress=progress, resume=resume, overwrite=overwrite)
