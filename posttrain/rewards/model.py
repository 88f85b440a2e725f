"""Reward models as scorers: load a trained reward model, reward packed sequences, and score (prompt, reply)
pairs with one model or an ensemble (its mean; the spread is a reward-hacking signal).

The model is ``AutoModelForSequenceClassification`` (one label); the reward of a sequence is the score head on
the hidden state of its last token, exactly where ``transformers`` pools.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from posttrain.data.batching import pack
from posttrain.data.encode import Example, encode_row
from posttrain.errors import ConfigError
from posttrain.models.loading import load_tokenizer, resolve
from posttrain.models.varlen import packed_attention


def load_reward_model(spec: str, *, dtype: str = "float32", trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(sequence-classification model with one label, tokenizer) for a causal-LM or reward-model directory."""
    from transformers import AutoModelForSequenceClassification

    path = resolve(spec)
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=1,
        dtype=getattr(torch, dtype),
        pad_token_id=tokenizer.pad_token_id,
        trust_remote_code=trust_remote_code,
    )
    return model, tokenizer


def sequence_rewards(model: Any, examples: list[Example]) -> torch.Tensor:
    """(n,) rewards of ``examples``: score head on each packed sequence's last hidden state."""
    device = next(model.parameters()).device
    batch = pack(examples).to(device)
    with packed_attention(model):
        hidden = model.base_model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, posttrain_bounds=batch.bounds, use_cache=False
        ).last_hidden_state
    last = torch.tensor(batch.bounds[1:], device=device) - 1
    return model.score(hidden[0, last]).squeeze(-1).float()


class RewardModelScorer:
    """Reward of (prompt, reply) under one reward model or the mean of an ensemble (``disagreement`` = their
    standard deviation, a reward-hacking signal). Usable as a reward function: ``--reward rm:DIR[+DIR...]``.

    The scorer receives the row's prompt (``wants_prompt``); replies are scored as the assistant turn."""

    wants_prompt = True

    def __init__(self, paths: list[str]):
        if not paths:
            raise ConfigError("reward rm: give at least one reward-model directory (rm:DIR or rm:DIR1+DIR2)")
        self.models = []
        for path in paths:
            if not Path(path).is_dir():
                raise ConfigError(f"reward rm:{path}: no such reward-model directory")
            model, tokenizer = load_reward_model(path)
            self.models.append(model.eval())
            self.tokenizer = tokenizer

    @torch.no_grad()
    def score(self, prompts: list[Any], completions: list[str]) -> tuple[list[float], list[float]]:
        """(mean reward, disagreement) per (prompt, completion)."""
        examples = [
            encode_row(
                {"prompt": p, "completion": [{"role": "assistant", "content": c}] if isinstance(p, list) else c},
                self.tokenizer,
                completion_only=False,
            )
            for p, c in zip(prompts, completions)
        ]
        per_model = [sequence_rewards(m, examples).tolist() for m in self.models]
        means = [statistics.fmean(values) for values in zip(*per_model)]
        spread = [statistics.pstdev(values) if len(values) > 1 else 0.0 for values in zip(*per_model)]
        return means, spread

    def __call__(self, completion: str, *, prompt: Any = None, **_: Any) -> float:
        means, spread = self.score([prompt if prompt is not None else ""], [completion])
        if len(self.models) > 1:
            self.last_disagreement = spread[0]  # read by score_completions (Scores.disagreement)
        return means[0]
