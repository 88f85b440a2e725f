"""``posttrain eval``: accuracy (strict, lenient and fair), pass@k and perplexity of a model on held-out rows.

Every reply gets three marks (rules in ``posttrain.tasks.answers``): *strict* (the expected format, the headline
``accuracy``), *lenient* (the final answer, case and format ignored) and *fair* (what a real instruction-tuned
model can earn without the format: the task's ``fair``, ``fair_answer`` for user rows). The result keeps the
first ``show_examples`` replies with their marks.

>>> from posttrain.config import build_config, EvalConfig
>>> values = {"task": "uppercase", "limit": 8, "max_new_tokens": 12, "show_examples": 2}
>>> cfg = build_config(EvalConfig, values, path="eval")
>>> result = evaluate(cfg)
>>> 0.0 <= result["accuracy_fair"] <= 1.0, result["rows"], len(result["examples"]), sorted(result["examples"][0])
(True, 8, 2, ['answer', 'completion', 'fair', 'lenient', 'prompt', 'strict'])
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
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
from posttrain.tasks import Task, get_task
from posttrain.tasks.answers import fair_answer
from posttrain.tasks.text import is_text_source, text_rows

Marks = tuple[bool, bool, bool]  # (strict, lenient, fair) of one reply


def marks_scorer(task: Task | None = None) -> Callable[[str, str], Marks]:
    """The scorer of a task's rows (``task``) or of user rows (None): a reply and its gold answer -> (strict,
    lenient, fair). Strict and lenient are ``score_answer`` for every task; fair is the task's ``fair``, and
    ``fair_answer`` for user rows.

    >>> score = marks_scorer(get_task("uppercase"))
    >>> score("PLOMK", "PLOMK"), score("plomk", "PLOMK"), score("Here it is:\\nPLOMK", "PLOMK")
    ((True, True, True), (False, True, False), (False, True, True))
    >>> marks_scorer()("so 2 + 3 = 5", "5")
    (False, True, True)
    """
    fair = task.fair if task is not None else fair_answer

    def score(completion: str, answer: str) -> Marks:
        strict, lenient = score_answer(completion, answer)
        return strict, lenient, fair(completion, answer)

    return score


def _rows_and_scorer(cfg: Any) -> tuple[list[dict], Callable[[str, str], Marks], str]:
    """The eval rows, their (strict, lenient, fair) scorer (``marks_scorer``) and a name for their source. Built-in
    tasks and user files alike get strict and lenient from ``score_answer``, the one verifier (a task's ``score``
    is the same function); fair is the task's own rule, ``fair_answer`` for a user file."""
    if bool(cfg.task) == bool(cfg.data):
        raise ConfigError(
            "eval: give exactly one of task (a built-in task name) or data (a file of prompt/answer rows)"
        )
    if cfg.task:
        task = get_task(cfg.task)
        return task.rows("test"), marks_scorer(task), f"task:{cfg.task}:test"
    rows = validate_rows(load_rows(cfg.data), "prompt", source=cfg.data).rows
    for i, row in enumerate(rows):
        if not isinstance(row.get("answer"), (str, int, float)):
            raise DataError(cfg.data, i + 1, "answer", "an eval row needs an answer (string or number)")
        row["answer"] = str(row["answer"])
    return rows, marks_scorer(), cfg.data


def heldout_accuracy(
    engine: Any, rows: list[dict], max_new_tokens: int, *, fair: Callable[[str, str], bool] = fair_answer
) -> dict[str, float]:
    """Greedy strict, lenient and fair accuracy of the engine's model on ``rows`` (``score_answer``, and ``fair``:
    ``fair_answer`` unless a task's rule is given): the held-out accuracy GRPO logs, shared with the harness.
    ``engine`` is a rollout engine (``.tokenizer``, ``.generate``); sampling is greedy with seed 0, so the
    numbers are reproducible.

    >>> from types import SimpleNamespace
    >>> from posttrain.models.tiny import build_tokenizer
    >>> texts = ["5+7=12\\nAnswer: 12", "it is 7", "Answer: 8"]
    >>> engine = SimpleNamespace(tokenizer=build_tokenizer(), generate=lambda p, s, seed: SimpleNamespace(texts=texts))
    >>> acc = heldout_accuracy(engine, [{"prompt": "q", "answer": a} for a in ("12", "7", "9")], max_new_tokens=8)
    >>> {k: round(v, 3) for k, v in acc.items()}
    {'eval_accuracy_strict': 0.333, 'eval_accuracy_lenient': 0.667, 'eval_accuracy_fair': 0.667}
    """
    prompts = [render_prompt(r, engine.tokenizer) for r in rows]
    out = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens), seed=0)
    scores = [(*score_answer(text, str(r["answer"])), fair(text, str(r["answer"]))) for text, r in zip(out.texts, rows)]
    return {
        "eval_accuracy_strict": sum(m[0] for m in scores) / len(rows),
        "eval_accuracy_lenient": sum(m[1] for m in scores) / len(rows),
        "eval_accuracy_fair": sum(m[2] for m in scores) / len(rows),
    }


def example_record(prompt: Any, completion: str, answer: str, marks: Marks) -> dict[str, Any]:
    """One kept example of an eval result: the prompt the model saw, its reply, the gold answer and the marks.

    >>> example_record("Q", "it is 5", "5", (False, True, True))
    {'prompt': 'Q', 'completion': 'it is 5', 'answer': '5', 'strict': False, 'lenient': True, 'fair': True}
    """
    strict, lenient, fair = marks
    return {
        "prompt": prompt,
        "completion": completion,
        "answer": answer,
        "strict": strict,
        "lenient": lenient,
        "fair": fair,
    }


def format_examples(examples: list[dict[str, Any]]) -> str:
    """The kept examples of an eval result as readable text (what ``posttrain eval`` can print).

    >>> print(format_examples([example_record("<|user|>What is 2+3?</s><|assistant|>", "2 + 3 = 5", "5",
    ...                                       (False, True, True))]))
    --- example 1: strict no, lenient yes, fair yes (gold answer: '5')
    prompt: '<|user|>What is 2+3?</s><|assistant|>'
    2 + 3 = 5
    """
    marks = lambda e: ", ".join(f"{k} {'yes' if e[k] else 'no'}" for k in ("strict", "lenient", "fair"))  # noqa: E731
    blocks = [
        f"--- example {i}: {marks(e)} (gold answer: {e['answer']!r})\nprompt: {e['prompt']!r}\n{e['completion']}"
        for i, e in enumerate(examples, start=1)
    ]
    return "\n".join(blocks)


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
    answer is scored (strict, lenient and fair); oracle pass@N (strict), which looks at the gold answer, is
    reported apart. The first ``cfg.show_examples`` chosen replies (of the last n) are kept with their marks."""
    from posttrain.search import search

    rows, scorer, source = _rows_and_scorer(cfg)
    rows = rows[: cfg.limit] if cfg.limit else rows
    points = []
    for n in cfg.scaling or [cfg.n]:
        torch.manual_seed(cfg.seed)
        results = search(model, tokenizer, rows, search_spec(cfg, n), helper=helper)
        marks = [scorer(r.completion, row["answer"]) for r, row in zip(results, rows)]
        oracle = [any(scorer(c, row["answer"])[0] for c in r.candidates) for r, row in zip(results, rows)]
        count = len(rows)
        points.append(
            {
                "strategy": cfg.strategy,
                "n": 1 if cfg.strategy == "greedy" else n,
                "accuracy": sum(m[0] for m in marks) / count,
                "accuracy_lenient": sum(m[1] for m in marks) / count,
                "accuracy_fair": sum(m[2] for m in marks) / count,
                "oracle_pass_at_n": sum(oracle) / count,
                "tokens_per_question": sum(r.tokens for r in results) / count,
                "forward_passes_per_question": sum(r.forward_passes for r in results) / count,
                "wall_s_per_question": sum(r.wall_s for r in results) / count,
                **search_watch(results, cfg.strategy),
            }
        )
    last = points[-1]
    result = {
        "source": source,
        "rows": len(rows),
        **last,
        "accuracy_strict": last["accuracy"],
        "examples": [
            example_record(render_prompt(row, tokenizer), r.completion, row["answer"], m)
            for r, row, m in list(zip(results, rows, marks))[: cfg.show_examples]
        ],
    }
    if cfg.scaling:
        result["scaling"] = points
        alerts = budget_alerts(points)
        if alerts:
            result["alerts"] = alerts
    return result


def search_watch(results: list[Any], strategy: str) -> dict[str, float]:
    """The reward-hacking monitor's view of one search budget: ``proxy_chosen``, the mean score of the chosen
    candidate where a scorer picks it (best-of-N, hybrid), and the within-question diversity of the candidates
    (``distinct_2``, ``overlap_2`` over whitespace words)."""
    from posttrain.safeguards.monitor import group_diversity

    out: dict[str, float] = {}
    with_pool = [r for r in results if len(r.candidates) > 1]
    if with_pool:
        stats = [group_diversity([c.split() for c in r.candidates], len(r.candidates)) for r in with_pool]
        for key in ("distinct_2", "overlap_2"):
            values = [st[key] for st in stats if key in st]
            if values:
                out[key] = sum(values) / len(values)
    if (
        strategy in ("best_of_n", "hybrid")
        and results
        and all(r.scores and r.completion in r.candidates for r in results)
    ):
        chosen = [r.scores[r.candidates.index(r.completion)] for r in results]
        out["proxy_chosen"] = sum(chosen) / len(chosen)
    return out


def budget_alerts(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The monitor's rules along the budgets of a scaling curve, in order of n: the chosen candidates' proxy score
    rising while accuracy (gold) falls is over-optimisation of the scorer (best-of-N's Goodhart curve)."""
    from posttrain.safeguards.monitor import HackingMonitor, Thresholds

    monitor = HackingMonitor(Thresholds(window=len(points), length_drift=0.0))
    alerts = []
    for point in points:
        stats = {"proxy": point.get("proxy_chosen"), "gold": point["accuracy"]}
        stats.update({k: point.get(k) for k in ("distinct_2", "overlap_2")})
        alerts += [{**a, "n": point["n"]} for a in monitor.observe(point["n"], stats)]
    return alerts


def evaluate_model(model: Any, tokenizer: Any, cfg: Any, *, helper: Any = None) -> dict[str, Any]:
    """Evaluate an already loaded model (see module docstring for the fields of the result)."""
    if cfg.strategy in SEARCH_STRATEGIES or cfg.scaling:
        return evaluate_search(model, tokenizer, cfg, helper=helper)
    if cfg.n < 1:
        raise ConfigError(f"eval.n: must be at least 1, got {cfg.n}")
    if cfg.strategy == "greedy" and cfg.n > 1:
        raise ConfigError("eval.n: greedy decoding gives one answer per prompt; use strategy sample for n > 1")
    rows, scorer, source = _rows_and_scorer(cfg)
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
    marks = [[scorer(s, r["answer"]) for s in group] for group, r in zip(samples, rows)]
    strict, lenient, fair = ([[m[j] for m in group] for group in marks] for j in range(3))
    mean = lambda grid: sum(sum(g) / len(g) for g in grid) / len(grid)  # noqa: E731
    result: dict[str, Any] = {
        "source": source,
        "strategy": cfg.strategy,
        "n": cfg.n,
        "rows": len(rows),
        "accuracy": mean(strict),
        "accuracy_strict": mean(strict),
        "accuracy_lenient": mean(lenient),
        "accuracy_fair": mean(fair),
        "pass_at_k": {
            str(k): sum(pass_at_k(n=cfg.n, c=sum(g), k=k) for g in strict) / len(rows) for k in ks_up_to(cfg.n)
        },
        "tokens_per_question": new_tokens / len(rows),
        "examples": [  # the first sample of each of the first show_examples rows
            example_record(p, s[0], r["answer"], m[0])
            for p, s, r, m in list(zip(prompts, samples, rows, marks))[: cfg.show_examples]
        ],
    }
    if cfg.perplexity_data:
        result["perplexity"] = perplexity(model, tokenizer, cfg.perplexity_data)
    result["wall_s"] = time.perf_counter() - started
    return result


def perplexity(model: Any, tokenizer: Any, source: str, *, max_length: int = 512) -> float:
    """Token-level perplexity of ``model`` on text rows (all tokens count): a data source (a file,
    ``corpus:val``, ...) or a shipped text set, ``text:NAME[:SPLIT]`` (``text:general``: ordinary English prose,
    see ``posttrain.tasks.text``)."""
    from posttrain.data.prepare import prepare_examples
    from posttrain.eval.loss import mean_nll

    rows = text_rows(source) if is_text_source(source) else source
    data = prepare_examples(
        rows, tokenizer, kind="text", max_length=max_length, length_policy="truncate", completion_only=False
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
