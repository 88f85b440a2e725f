"""Batched generation for evaluation, through a rollout engine (``posttrain.rollout``; the hf engine by default,
whose greedy outputs equal Hugging Face ``generate``'s).

>>> from posttrain.models.loading import load_model
>>> model, tok = load_model("builtin:tiny-base")
>>> out = generate_texts(model, tok, ["<|user|>Write in capitals: dog</s><|assistant|>"], max_new_tokens=8)
>>> out.texts, out.new_tokens
([['DOG']], 4)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.rollout import RolloutEngine, SamplingParams, engine_for


@dataclass
class Generations:
    """``texts[i]`` holds the completions of prompt i; ``new_tokens`` counts generated tokens (EOS included)."""

    texts: list[list[str]]
    new_tokens: int


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    n: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 96,
    batch_size: int = 256,
    engine: str | RolloutEngine = "hf",
    seed: int | None = None,
    progress: bool = False,
) -> Generations:
    """``n`` completions per prompt (special tokens removed), in prompt order; greedy unless ``do_sample``.

    ``engine`` is a rollout engine kind (``hf``, ``vllm``) or an engine already built for ``model``. Sampling is
    seeded by ``seed``, or, when it is None, by a number drawn from torch's global generator (so
    ``torch.manual_seed`` before the call makes it reproducible). ``progress`` shows a bar over the prompts when
    there is more than one batch (an evaluation of a real model takes minutes)."""
    from tqdm.auto import tqdm

    runner = engine_for(engine, model, tokenizer)
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    params = SamplingParams(
        n=n,
        temperature=temperature if do_sample else 0.0,
        top_p=top_p if do_sample else 1.0,
        max_new_tokens=max_new_tokens,
    )
    results: list[list[str]] = []
    new_tokens = 0
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress or len(prompts) <= batch_size)
    for start in range(0, len(prompts), batch_size):
        out = runner.generate(list(prompts[start : start + batch_size]), params, seed=seed + start)
        new_tokens += int(out.mask.sum())  # generated tokens, a completion's EOS counted once
        results += [out.texts[i : i + n] for i in range(0, len(out.texts), n)]
        bar.update(min(batch_size, len(prompts) - start))
    bar.close()
    return Generations(results, new_tokens)
