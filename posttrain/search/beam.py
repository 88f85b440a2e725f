"""Token-level beam search with a length penalty, on the model's KV cache (one prefill per question; beams
reorder the cache rows instead of recomputing prefixes).

A hypothesis's score is ``sum of token log-probs / length ** length_penalty`` (length counts the EOS). Beams
that emit EOS leave the beam and are kept as finished; the search stops when ``n`` hypotheses have finished
or ``max_new_tokens`` is reached, and the best-scoring finished-or-cut hypothesis wins (ties: the one found
first). With a width at least the number of possible sequences it is exhaustive search.

The model comes from the rollout engine's token-level access (``engine.decoding_model``): the hf engine has it,
the vllm engine refuses with a ``ConfigError``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from posttrain.data.encode import render_prompt
from posttrain.models.varlen import decoding_attention
from posttrain.rollout.engine import make_cache
from posttrain.search.voting import best_index, extract_answer


def normalised(logp: float, length: int, penalty: float) -> float:
    """The length-penalised beam score."""
    return logp / max(length, 1) ** penalty


@torch.no_grad()
def beam_search(engine: Any, rows: list[dict[str, Any]], spec: Any) -> list[Any]:
    """One ``SearchResult`` per row: beam search of width ``spec.n`` on ``engine``'s model."""
    from posttrain.search.strategies import SearchResult

    model, tokenizer = engine.decoding_model("search.strategy"), engine.tokenizer
    was_training = model.training
    model.eval()
    results = []
    try:
        with decoding_attention(model):
            for row in rows:
                started = time.perf_counter()
                ids = tokenizer(render_prompt(row, tokenizer), add_special_tokens=False)["input_ids"]
                hyps, tokens, passes = _beam_one(model, ids, spec, tokenizer.eos_token_id)
                texts = [tokenizer.decode(h[0], skip_special_tokens=True) for h in hyps]
                scores = [normalised(h[1], len(h[0]), spec.length_penalty) for h in hyps]
                pick = best_index(scores)
                results.append(
                    SearchResult(
                        completion=texts[pick],
                        answer=extract_answer(texts[pick]),
                        candidates=texts,
                        scores=scores,
                        tokens=tokens,
                        forward_passes=passes,
                        wall_s=time.perf_counter() - started,
                    )
                )
    finally:
        model.train(was_training)
    return results


def _beam_one(model: Any, prompt: list[int], spec: Any, eos: int) -> tuple[list[tuple[list[int], float]], int, int]:
    """(hypotheses as (token ids, summed log-prob), tokens computed, forward passes) for one prompt."""
    device = next(model.parameters()).device
    width = spec.n
    cache = make_cache(model, len(prompt) + spec.max_new_tokens)
    ids = torch.tensor([prompt], device=device)
    out = model(input_ids=ids, position_ids=torch.arange(len(prompt), device=device)[None], past_key_values=cache)
    logits, cache = out.logits[:, -1], out.past_key_values
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float]] = []
    computed, passes = 0, 1
    for t in range(spec.max_new_tokens):
        logps = torch.log_softmax(logits.float(), -1)  # (active beams, V)
        totals = torch.tensor([b[1] for b in beams], device=device)[:, None] + logps
        flat = totals.flatten()
        order = torch.argsort(flat, descending=True, stable=True)  # ties: lower beam, lower token id first
        vocab = logps.shape[-1]
        keep_rows, keep_tokens, next_beams = [], [], []
        for index in order.tolist():
            beam, token = divmod(index, vocab)
            hyp = (beams[beam][0] + [token], float(flat[index]))
            if token == eos:
                finished.append(hyp)
            else:
                keep_rows.append(beam)
                keep_tokens.append(token)
                next_beams.append(hyp)
            if len(next_beams) == width or len(finished) >= width:
                break
        if len(finished) >= width or not next_beams or t == spec.max_new_tokens - 1:
            return finished + (next_beams if t == spec.max_new_tokens - 1 else []), computed, passes
        beams = next_beams
        cache.batch_select_indices(torch.tensor(keep_rows, device=device))
        position = len(prompt) + t
        out = model(
            input_ids=torch.tensor(keep_tokens, device=device)[:, None],
            position_ids=torch.full((len(keep_tokens), 1), position, device=device),
            past_key_values=cache,
        )
        logits, cache = out.logits[:, -1], out.past_key_values
        computed += len(keep_tokens)
        passes += 1
    return finished + beams, computed, passes
