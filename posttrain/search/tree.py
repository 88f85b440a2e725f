"""Step-level Tree-of-Thought search on one KV cache, under a token budget.

A step ends at ``spec.delimiter`` (a newline by default) or at EOS. Each level expands every frontier node into
``spec.n`` sampled children, scores each partial solution with the value function (``spec.scorer``: a verifier
on partial work such as ``arithmetic_steps``, reward functions, or ``logprob`` = the model's own mean token
log-prob), prunes children a verifier scores 0, and keeps the best ``spec.keep`` (beam search over steps; ties
go to the higher log-prob, then to the child found first). When the remaining budget no longer covers a full
level (at the average step length so far) plus finishing one node, the search follows the best node alone
with one sample per step, so it can still finish inside its budget. Children that ended with EOS are complete answers;
the best complete answer wins (or the best partial one if the budget ran out first).

The cache is never recomputed: the frontier's cache rows are repeated ``n`` times to expand (a child starts
from its parent's keys and values) and the kept children's rows are selected for the next level. Rows whose
step ended wait (masked padding) while the others finish theirs. ``spec.token_budget`` (default
``n * keep * max_new_tokens``) caps the generated tokens per question: generation stops the moment it is spent.
The model comes from the rollout engine's token-level access (``engine.decoding_model``): the hf engine has it,
the vllm engine refuses with a ``ConfigError``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from posttrain.data.encode import render_prompt
from posttrain.models.varlen import decoding_attention
from posttrain.rollout.engine import SamplingParams, make_cache, sample_tokens
from posttrain.search.voting import extract_answer


def budget_of(spec: Any) -> int:
    """The token budget per question."""
    return spec.token_budget or spec.n * spec.keep * spec.max_new_tokens


@torch.no_grad()
def tree_search(engine: Any, rows: list[dict[str, Any]], spec: Any) -> list[Any]:
    """One ``SearchResult`` per row: step-level tree search on ``engine``'s model."""
    model, tokenizer = engine.decoding_model("search.strategy"), engine.tokenizer
    was_training = model.training
    model.eval()
    try:
        with decoding_attention(model):
            return [_tree_one(model, tokenizer, row, spec, seed=spec.seed + i) for i, row in enumerate(rows)]
    finally:
        model.train(was_training)


def _values(spec: Any, texts: list[str], row: dict[str, Any], logps: list[float]) -> list[float]:
    from posttrain.search.strategies import score

    return score(spec, texts, [row] * len(texts), logps)


def _tree_one(model: Any, tokenizer: Any, row: dict[str, Any], spec: Any, *, seed: int) -> Any:
    from posttrain.search.strategies import SearchResult

    started = time.perf_counter()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    budget = budget_of(spec)
    prompt = tokenizer(render_prompt(row, tokenizer), add_special_tokens=False)["input_ids"]
    cache = make_cache(model, len(prompt) + budget + 1)  # one slot per forward; each spends >= 1 token
    out = model(input_ids=torch.tensor([prompt], device=device), past_key_values=cache, use_cache=True)
    logits, cache = out.logits[:, -1], out.past_key_values
    attn = torch.ones(1, len(prompt), dtype=torch.long, device=device)
    positions = torch.tensor([len(prompt)], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    params = SamplingParams(temperature=spec.temperature, top_p=spec.top_p)
    nodes: list[tuple[list[int], float]] = [([], 0.0)]  # (tokens so far, summed log-prob) per frontier row
    complete: list[tuple[str, float, float]] = []  # (text, value, mean log-prob)
    partial: list[tuple[str, float, float]] = []
    spent, passes = 0, 1
    step_tokens, steps_taken = 0, 0
    while nodes and spent < budget:
        # Branch fully while the budget allows another level at the average step length seen so far; then
        # follow each kept node with a single sample, so the search can still finish inside its budget.
        average = step_tokens / steps_taken if steps_taken else 1
        finish = spec.max_new_tokens - min(len(t) for t, _ in nodes)  # worst case to complete one node
        k = spec.n
        if budget - spent < spec.n * len(nodes) * average + finish and len(nodes) * spec.n > 1:
            k = 1
            if len(nodes) > 1:  # complete the best node only (nodes are kept best first)
                first = torch.tensor([0], device=device)
                cache.batch_select_indices(first)
                attn, positions, logits, nodes = attn[first], positions[first], logits[first], nodes[:1]
        before = spent
        logits, attn, positions = (x.repeat_interleave(k, 0) for x in (logits, attn, positions))
        cache.batch_repeat_interleave(k)
        children = [(list(t), lp) for t, lp in nodes for _ in range(k)]
        step_done = [False] * len(children)
        ended = [False] * len(children)
        while not all(step_done) and spent < budget:
            new, new_logps = sample_tokens(logits, params, generator)
            feed, fed = [], []
            for i, (token, logp) in enumerate(zip(new.tolist(), new_logps.tolist())):
                if step_done[i] or spent >= budget:
                    step_done[i] = True
                    feed.append(pad)
                    fed.append(False)
                    continue
                tokens, total = children[i]
                tokens.append(token)
                children[i] = (tokens, total + logp)
                spent += 1
                if token == eos or len(tokens) >= spec.max_new_tokens:
                    step_done[i] = ended[i] = True
                elif tokenizer.decode(tokens, skip_special_tokens=True).endswith(spec.delimiter):
                    step_done[i] = True
                # Every sampled token but EOS enters the cache, the step's delimiter included.
                feed.append(pad if ended[i] else token)
                fed.append(not ended[i])
            if not any(fed):
                break
            # Rows with nothing to feed wait on a masked pad token, so every row keeps one cache layout; their
            # next-token logits stay those computed when they last fed a real token.
            fed_mask = torch.tensor(fed, device=device)
            attn = torch.cat([attn, fed_mask.long()[:, None]], dim=-1)
            out = model(
                input_ids=torch.tensor(feed, device=device)[:, None],
                attention_mask=attn,
                position_ids=positions[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            positions = positions + fed_mask.long()
            logits = torch.where(fed_mask[:, None], out.logits[:, -1], logits)
            cache = out.past_key_values
            passes += 1
        step_tokens, steps_taken = step_tokens + spent - before, steps_taken + len(children)
        texts = [tokenizer.decode(c[0], skip_special_tokens=True) for c in children]
        means = [lp / max(len(t), 1) for t, lp in children]
        values = _values(spec, texts, row, means)
        order = sorted(range(len(children)), key=lambda i: (-values[i], -means[i], i))
        keep = []
        for i in order:
            if ended[i]:
                complete.append((texts[i], values[i], means[i]))
            elif spent >= budget:
                partial.append((texts[i], values[i], means[i]))
            elif values[i] > 0 or tuple(spec.scorer) == ("logprob",):  # a verifier's 0 prunes the branch
                if len(keep) < spec.keep:
                    keep.append(i)
        if not keep:
            break
        index = torch.tensor(keep, device=device)
        cache.batch_select_indices(index)
        attn, positions, logits = attn[index], positions[index], logits[index]
        nodes = [children[i] for i in keep]
    pool = complete or partial or [("", 0.0, 0.0)]
    best = sorted(range(len(pool)), key=lambda i: (-pool[i][1], -pool[i][2], i))[0]
    return SearchResult(
        completion=pool[best][0],
        answer=extract_answer(pool[best][0]),
        candidates=[p[0] for p in pool],
        scores=[p[1] for p in pool],
        tokens=spent,
        forward_passes=passes,
        wall_s=time.perf_counter() - started,
    )
