"""Inference-time search: spend more compute per question, pick a better answer, and count what it cost.

Strategies (``SearchSpec.strategy``):

- ``greedy`` and ``sample``: one completion (``sample`` with ``n`` > 1 keeps all ``n``; accuracy is their mean);
- ``best_of_n``: ``n`` samples sharing the prompt's prefill, the highest-scoring one wins;
- ``self_consistency``: ``n`` samples, majority vote over their final answers (``weighted``: score-weighted);
- ``beam``: token-level beam search of width ``n`` with a length penalty (``posttrain.search.beam``);
- ``tree``: step-level Tree-of-Thought search (``posttrain.search.tree``);
- ``hybrid``: a helper model proposes ``n`` candidates and the main model scores them by mean log-prob (or a
  scorer does), or the reverse with ``helper_role="score"``.

Generation goes through a rollout engine (``posttrain.rollout``): ``SearchSpec.engine`` names the kind (``hf``
or ``vllm``), or ``search(..., engine=...)`` takes an engine the caller already holds. Beam and tree search
need the engine's token-level access to the model (``decoding_model``), which only the hf engine has.

Scorers never see the gold answer: rows reach them without their ``answer`` column, and reward functions that
need it (``correct``) are refused. Oracle pass@N, which does look at the gold, is computed by the evaluation
harness apart from the deployable strategies.

Compute accounting per question: generated tokens (all candidates and steps), forward passes (batched calls
that worked on the question; a batched call counts once for each question in it) and wall time (a batch's
wall time shared out in proportion to tokens).

    >>> from posttrain.models.loading import load_model
    >>> model, tok = load_model("builtin:tiny-base")
    >>> rows = [{"prompt": [{"role": "user", "content": "Write in capitals: dog"}], "answer": "DOG"}]
    >>> [r.completion for r in search(model, tok, rows, SearchSpec(strategy="self_consistency", n=4))]
    ['DOG']
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from posttrain.data.encode import render_prompt
from posttrain.errors import ConfigError
from posttrain.rewards import parse_rewards, score_completions
from posttrain.rewards.builtin import NEEDS_GOLD
from posttrain.rollout import ENGINES, RolloutEngine, SamplingParams, engine_for, make_engine
from posttrain.rollout.engine import Rollouts
from posttrain.search.voting import best_index, extract_answer, majority_vote, weighted_vote

STRATEGIES = ("greedy", "sample", "best_of_n", "self_consistency", "beam", "tree", "hybrid")


@dataclass(frozen=True)
class SearchSpec:
    """How to search. ``n``: samples (best_of_n, self_consistency, hybrid), beam width (beam), or branches per
    node (tree). ``scorer``: ``logprob`` (mean token log-prob under the scoring model) or reward functions
    (built-in names or module:function) that do not need the gold answer. ``engine``: the rollout engine kind
    that generates (``hf`` or ``vllm``)."""

    strategy: Literal["greedy", "sample", "best_of_n", "self_consistency", "beam", "tree", "hybrid"] = "greedy"
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    scorer: tuple[str, ...] = ("logprob",)
    weighted: bool = False
    length_penalty: float = 1.0
    delimiter: str = "\n"
    keep: int = 2
    token_budget: int = 0
    helper_role: Literal["propose", "score"] = "propose"
    batch_size: int = 64
    seed: int = 0
    engine: str = "hf"


@dataclass
class SearchResult:
    """One question's outcome: the chosen completion, its extracted answer, the candidates considered (with
    their scores) and the compute spent."""

    completion: str
    answer: str | None
    candidates: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    tokens: int = 0
    forward_passes: int = 0
    wall_s: float = 0.0


def check_spec(spec: SearchSpec) -> None:
    """Reject impossible settings with the config key's name."""
    if spec.strategy not in STRATEGIES:
        choices = ", ".join(STRATEGIES)
        raise ConfigError(f"search.strategy: unknown strategy {spec.strategy!r} (choose one of {choices})")
    if spec.n < 1:
        raise ConfigError(f"search.n: must be at least 1, got {spec.n}")
    if spec.strategy == "greedy" and spec.n != 1:
        raise ConfigError("search.n: greedy decoding gives one answer per prompt; use sample or a search strategy")
    if spec.engine not in ENGINES:
        raise ConfigError(f"search.engine: unknown engine {spec.engine!r} (choose one of {', '.join(ENGINES)})")
    if spec.engine == "vllm" and spec.strategy in ("beam", "tree"):
        raise ConfigError(
            f"search.strategy: {spec.strategy} search drives the model's KV cache token by token, which the vllm"
            " engine does not expose; use the hf engine for it"
        )
    if spec.max_new_tokens < 1:
        raise ConfigError(f"search.max_new_tokens: must be at least 1, got {spec.max_new_tokens}")
    gold = [s for s in spec.scorer if s in NEEDS_GOLD]
    if gold:
        raise ConfigError(
            f"search.scorer: {gold[0]!r} compares with the gold answer, which a deployable strategy never sees"
            " (oracle pass@N is reported separately); use logprob, format, arithmetic_steps or your own verifier"
        )


def scorer_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as a scorer sees them: no gold ``answer`` (nor ``completion``); ``question`` always present."""
    out = []
    for row in rows:
        prompt = row.get("prompt")
        question = row.get("question")
        if question is None:
            question = prompt if isinstance(prompt, str) else (prompt or [{}])[-1].get("content", "")
        out.append({**{k: v for k, v in row.items() if k not in ("answer", "completion")}, "question": question})
    return out


def mean_logps(rollouts: Rollouts) -> list[float]:
    """Mean per-token log-prob of each completion (the engine's own numbers; no extra forward pass)."""
    lengths = rollouts.mask.sum(-1).clamp(min=1)
    return (rollouts.logps.sum(-1) / lengths).tolist()


def score(spec: SearchSpec, texts: list[str], rows: list[dict[str, Any]], logps: list[float]) -> list[float]:
    """Scores of ``texts`` (one row per text): the mean log-prob, or the weighted sum of the reward scorers."""
    if tuple(spec.scorer) == ("logprob",):
        return list(logps)
    specs = parse_rewards([s for s in spec.scorer if s != "logprob"])
    total = score_completions(specs, texts, scorer_rows(rows)).total.tolist()
    if "logprob" in spec.scorer:  # log-prob as a tie-breaker below any reward difference
        total = [t + 1e-3 * lp for t, lp in zip(total, logps)]
    return total


def search(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    spec: SearchSpec,
    *,
    helper: Any = None,
    engine: RolloutEngine | None = None,
) -> list[SearchResult]:
    """Run ``spec`` on every row (``{"prompt", ...}``) and return one ``SearchResult`` per row, in order.
    ``helper`` is the (model, tokenizer) pair of the hybrid strategy's second model. ``engine`` generates for
    ``model`` (default: a new one of kind ``spec.engine``; pass one to reuse it across calls)."""
    check_spec(spec)
    if spec.strategy == "hybrid" and helper is None:
        raise ConfigError("search.helper_model: the hybrid strategy needs a second (helper) model")
    main = spec.engine if engine is None else engine
    if spec.strategy in ("beam", "tree"):
        from posttrain.search.beam import beam_search
        from posttrain.search.tree import tree_search

        run = beam_search if spec.strategy == "beam" else tree_search
        return run(engine_for(main, model, tokenizer), rows, spec)
    proposer, scorer_model = None, None
    if spec.strategy == "hybrid":
        _check_same_vocab(tokenizer, helper[1])
        if spec.helper_role == "propose":  # the cheaper helper samples, the main model judges
            proposer, scorer_model = make_engine(spec.engine, *helper), model
        else:
            scorer_model = helper[0]
    proposer = proposer or engine_for(main, model, tokenizer)
    results: list[SearchResult] = []
    for start in range(0, len(rows), spec.batch_size):
        chunk = rows[start : start + spec.batch_size]
        results += _sampled(proposer, scorer_model, chunk, spec, seed=spec.seed + start)
    return results


def _sampled(
    proposer: RolloutEngine, scorer_model: Any, rows: list[dict[str, Any]], spec: SearchSpec, *, seed: int
) -> list[SearchResult]:
    """Candidates sampled by ``proposer``; scored by their own log-probs, or re-scored by ``scorer_model``."""
    started = time.perf_counter()
    greedy = spec.strategy == "greedy"
    params = SamplingParams(
        n=1 if greedy else spec.n,
        temperature=0.0 if greedy else spec.temperature,
        top_p=spec.top_p,
        max_new_tokens=spec.max_new_tokens,
    )
    prompts = [render_prompt(r, proposer.tokenizer) for r in rows]
    out = proposer.generate(prompts, params, seed=seed)
    passes = out.forward_passes
    logps = mean_logps(out)
    if scorer_model is not None and tuple(spec.scorer) == ("logprob",):
        from posttrain.rollout.scoring import completion_logps

        with torch.no_grad():
            scored = completion_logps(scorer_model, out, temperature=1.0)
        logps = (scored.sum(-1) / out.mask.sum(-1).clamp(min=1)).tolist()
        passes += 1
    per = params.n
    texts = out.texts
    row_of = [rows[i] for i in out.prompt_index]
    needs_scores = spec.strategy in ("best_of_n", "hybrid") or (spec.strategy == "self_consistency" and spec.weighted)
    scores = score(spec, texts, row_of, logps) if needs_scores else logps
    tokens = out.mask.sum(-1).tolist()
    total_tokens = max(sum(tokens), 1)
    wall = time.perf_counter() - started
    results = []
    for q in range(len(rows)):
        cand, sc = texts[q * per : (q + 1) * per], scores[q * per : (q + 1) * per]
        answers = [extract_answer(t) for t in cand]
        if spec.strategy == "self_consistency":
            weights = [float(torch.tensor(s).exp()) for s in sc] if tuple(spec.scorer) == ("logprob",) else sc
            winner, _ = weighted_vote(answers, weights) if spec.weighted else majority_vote(answers)
            pick = answers.index(winner) if winner is not None else 0
        elif spec.strategy in ("best_of_n", "hybrid"):
            pick = best_index(sc)
        else:
            pick = 0
        q_tokens = int(sum(tokens[q * per : (q + 1) * per]))
        results.append(
            SearchResult(
                completion=cand[pick],
                answer=answers[pick],
                candidates=cand,
                scores=[float(s) for s in sc],
                tokens=q_tokens,
                forward_passes=passes,
                wall_s=wall * q_tokens / total_tokens,
            )
        )
    return results


def _check_same_vocab(tokenizer: Any, other: Any) -> None:
    if tokenizer.get_vocab() != other.get_vocab():
        raise ConfigError("search.helper_model: the helper model must share the main model's tokenizer")
