"""Batched generation for evaluation with Hugging Face ``generate`` (KV cache, left padding).

>>> from posttrain.models.loading import load_model
>>> model, tok = load_model("builtin:tiny-base")
>>> out = generate_texts(model, tok, ["<|user|>Write in capitals: dog</s><|assistant|>"], max_new_tokens=8)
>>> out.texts
[['DOG']]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Generations:
    """``texts[i]`` holds the completions of prompt i; ``new_tokens`` counts generated tokens (EOS included)."""

    texts: list[list[str]]
    new_tokens: int


@torch.no_grad()
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
) -> Generations:
    """``n`` completions per prompt (special tokens removed), in prompt order."""
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    results: list[list[str]] = []
    new_tokens = 0
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            kwargs: dict[str, Any] = dict(
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            if do_sample:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            out = model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1] :]
            done = (out == tokenizer.eos_token_id) | (out == tokenizer.pad_token_id)
            new_tokens += int((~done).sum()) + int(done.any(-1).sum())
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            results += [texts[i : i + n] for i in range(0, len(texts), n)]
    finally:
        tokenizer.padding_side = side
    return Generations(results, new_tokens)
