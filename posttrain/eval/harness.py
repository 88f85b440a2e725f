"""``posttrain eval``: accuracy (strict and lenient), pass@k and perplexity of a model on held-out rows.

>>> from posttrain.config import build_config, EvalConfig
>>> cfg = build_config(EvalConfig, {"task": "uppercase", "limit": 8, "max_new_tokens": 12}, path="eval")
>>> result = evaluate(cfg)
>>> 0.0 <= result["accuracy"] <= 1.0, result["rows"]
(True, 8)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from posttrain.data.encode import render_prompt
from posttrain.data.rows import load_rows, validate_rows
from posttrain.distributed import resolve_device
from posttrain.errors import ConfigError, DataError
from posttrain.eval.generate import generate_texts
from posttrain.eval.metrics import ks_up_to, pass_at_k
from posttrain.models.loading import load_model
from posttrain.models.templates import use_chat_template
from posttrain.rewards.verify import score_answer
from posttrain.rollout import SamplingParams
from posttrain.rundir import check_output_file, write_atomic
from posttrain.tasks import get_task


def _rows_and_scorer(cfg: Any) -> tuple[list[dict], Any, str]:
    """The eval rows, their scorer and a name for their source. Built-in tasks and user files alike are scored
    by ``score_answer``, the one verifier (a task's ``score`` is the same function)."""
    if bool(cfg.task) == bool(cfg.data):
        raise ConfigError(
            "eval: give exactly one of task (a built-in task name) or data (a file of prompt/answer rows)"
        )
    if cfg.task:
        return get_task(cfg.task).rows("test"), score_answer, f"task:{cfg.task}:test"
    rows = validate_rows(load_rows(cfg.data), "prompt", source=cfg.data).rows
    for i, row in enumerate(rows):
        if not isinstance(row.get("answer"), (str, int, float)):
            raise DataError(cfg.data, i + 1, "answer", "an eval row needs an answer (string or number)")
        row["answer"] = str(row["answer"])
    return rows, score_answer, cfg.data


def heldout_accuracy(engine: Any, rows: list[dict], max_new_tokens: int) -> dict[str, float]:
    """Greedy strict and lenient accuracy of the engine's model on ``rows`` (scored by ``score_answer``): the
    held-out accuracy GRPO logs, shared with the harness. ``engine`` is a rollout engine (``.tokenizer``,
    ``.generate``); sampling is greedy with seed 0, so the numbers are reproducible.

    >>> from types import SimpleNamespace
    >>> from posttrain.models.tiny import build_tokenizer
    >>> texts = ["5+7=12\\nAnswer: 12", "it is 7", "Answer: 8"]
    >>> engine = SimpleNamespace(tokenizer=build_tokenizer(), generate=lambda p, s, seed: SimpleNamespace(texts=texts))
    >>> heldout_accuracy(engine, [{"prompt": "q", "answer": a} for a in ("12", "7", "9")], max_new_tokens=8)
    {'eval_accuracy_strict': 0.3333333333333333, 'eval_accuracy_lenient': 0.6666666666666666}
    """
    prompts = [render_prompt(r, engine.tokenizer) for r in rows]
    out = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens), seed=0)
    scores = [score_answer(text, str(r["answer"])) for text, r in zip(out.texts, rows)]
    return {
        "eval_accuracy_strict": sum(s for s, _ in scores) / len(rows),
        "eval_accuracy_lenient": sum(le for _, le in scores) / len(rows),
    }


SEARCH_STRATEGIES = ("best_of_n", "self_consistency", "beam", "tree", "hybrid")


def search_spec(cfg: Any, n: int) -> Any:
    """The ``SearchSpec`` of an eval config at ``n``."""
    from posttrain.search import SearchSpec

    return SearchSpec(
        strategy=cfg.strategy,
        n=1 if cfg.strategy == "greedy" else n,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        scorer=tuple(cfg.scorer),
        weighted=cfg.weighted,
        length_penalty=cfg.length_penalty,
        delimiter=cfg.delimiter.encode().decode("unicode_escape"),
        keep=cfg.keep,
        token_budget=cfg.token_budget,
        helper_role=cfg.helper_role,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        engine=cfg.engine,
    )


def evaluate_search(model: Any, tokenizer: Any, cfg: Any, *, helper: Any = None) -> dict[str, Any]:
    """Accuracy and compute of a search strategy at ``cfg.n`` (or at each n of ``cfg.scaling``). The chosen
    answer is scored (strict and lenient); oracle pass@N, which looks at the gold answer, is reported apart."""
    from posttrain.search import search

    rows, scorer, source = _rows_and_scorer(cfg)
    rows = rows[: cfg.limit] if cfg.limit else rows
    points = []
    for n in cfg.scaling or [cfg.n]:
        torch.manual_seed(cfg.seed)
        results = search(model, tokenizer, rows, search_spec(cfg, n), helper=helper)
        strict = [scorer(r.completion, row["answer"])[0] for r, row in zip(results, rows)]
        lenient = [scorer(r.completion, row["answer"])[1] for r, row in zip(results, rows)]
        oracle = [any(scorer(c, row["answer"])[0] for c in r.candidates) for r, row in zip(results, rows)]
        count = len(rows)
        points.append(
            {
                "strategy": cfg.strategy,
                "n": 1 if cfg.strategy == "greedy" else n,
                "accuracy": sum(strict) / count,
                "accuracy_lenient": sum(lenient) / count,
                "oracle_pass_at_n": sum(oracle) / count,
                "tokens_per_question": sum(r.tokens for r in results) / count,
                "forward_passes_per_question": sum(r.forward_passes for r in results) / count,
                "wall_s_per_question": sum(r.wall_s for r in results) / count,
            }
        )
    last = points[-1]
    result = {
        "source": source,
        "rows": len(rows),
        **last,
        "accuracy_strict": last["accuracy"],
        "examples": [
            {"prompt": row["prompt"], "completion": r.completion, "answer": row["answer"]}
            for r, row in list(zip(results, rows))[:5]
        ],
    }
    if cfg.scaling:
        result["scaling"] = points
    return result


def evaluate_model(model: Any, tokenizer: Any, cfg: Any, *, helper: Any = None) -> dict[str, Any]:
    """Evaluate an already loaded model (see module docstring for the fields of the result)."""
    if cfg.strategy in SEARCH_STRATEGIES or cfg.scaling:
        return evaluate_search(model, tokenizer, cfg, helper=helper)
    if cfg.n < 1:
        raise ConfigError(f"eval.n: must be at least 1, got {cfg.n}")
    if cfg.strategy == "greedy" and cfg.n > 1:
        raise ConfigError("eval.n: greedy decoding gives one answer per prompt; use strategy sample for n > 1")
    rows, score, source = _rows_and_scorer(cfg)
    rows = rows[: cfg.limit] if cfg.limit else rows
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    prompts = [render_prompt(r, tokenizer) for r in rows]
    generations = generate_texts(
        model,
        tokenizer,
        prompts,
        n=cfg.n,
        do_sample=cfg.strategy == "sample",
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        engine=cfg.engine,
        progress=cfg.progress,
    )
    samples, new_tokens = generations.texts, generations.new_tokens
    strict = [[score(s, r["answer"])[0] for s in group] for group, r in zip(samples, rows)]
    lenient = [[score(s, r["answer"])[1] for s in group] for group, r in zip(samples, rows)]
    mean = lambda grid: sum(sum(g) / len(g) for g in grid) / len(grid)  # noqa: E731
    result: dict[str, Any] = {
        "source": source,
        "strategy": cfg.strategy,
        "n": cfg.n,
        "rows": len(rows),
        "accuracy": mean(strict),
        "accuracy_strict": mean(strict),
        "accuracy_lenient": mean(lenient),
        "pass_at_k": {
            str(k): sum(pass_at_k(n=cfg.n, c=sum(g), k=k) for g in strict) / len(rows) for k in ks_up_to(cfg.n)
        },
        "tokens_per_question": new_tokens / len(rows),
        "examples": [
            {"prompt": p, "completion": s[0], "answer": r["answer"], "strict": st[0], "lenient": le[0]}
            for p, s, r, st, le in list(zip(prompts, samples, rows, strict, lenient))[:5]
        ],
    }
    if cfg.perplexity_data:
        result["perplexity"] = perplexity(model, tokenizer, cfg.perplexity_data)
    result["wall_s"] = time.perf_counter() - started
    return result


def perplexity(model: Any, tokenizer: Any, source: str, *, max_length: int = 512) -> float:
    """Token-level perplexity of ``model`` on text rows (all tokens count)."""
    from posttrain.data.prepare import prepare_examples
    from posttrain.eval.loss import mean_nll

    data = prepare_examples(
        source, tokenizer, kind="text", max_length=max_length, length_policy="truncate", completion_only=False
    )
    nll = mean_nll(model, data.examples)["loss"]
    return math.exp(min(nll, 50.0))


def evaluate(cfg: Any) -> dict[str, Any]:
    """Load ``cfg.model``, evaluate it and write ``cfg.out`` (JSON) if given."""
    if cfg.out:  # checked before the work, so that the results are never lost to a bad path at the end
        check_output_file(cfg.out, key="eval.out", overwrite=cfg.overwrite)
        if cfg.scaling:  # the curve's page goes next to the JSON
            check_output_file(Path(cfg.out).with_suffix(".html"), key="eval.out", overwrite=cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    tokenizer = use_chat_template(tokenizer, cfg.chat_template, key="eval.chat_template")
    model.to(resolve_device("auto"))
    helper = None
    if cfg.helper_model:
        helper = load_model(cfg.helper_model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        helper[0].to(resolve_device("auto"))
    result = {"model": cfg.model, **evaluate_model(model, tokenizer, cfg, helper=helper)}
    if cfg.out:
        write_atomic(cfg.out, json.dumps(result, indent=1))
        if result.get("scaling"):  # the accuracy-vs-compute curve next to the JSON
            from posttrain.report import write_search_report

            write_search_report(Path(cfg.out).with_suffix(".html"), result["scaling"], title=f"{cfg.model}: search")
    return result
