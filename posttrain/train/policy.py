"""The model a stage trains: loaded (or freshly built), on its device, with LoRA adapters when asked."""

from __future__ import annotations

from typing import Any

import torch

from posttrain.models.loading import load_model
from posttrain.models.lora import add_lora

FRESH_MODELS = {"builtin:tiny": "tiny", "builtin:small": "small"}


def model_for_training(cfg: Any, device: torch.device) -> tuple[Any, Any]:
    """(model, tokenizer) for ``cfg.model``: an HF dir, an adapter dir (merged into its base and trained on), a
    builtin, or a fresh random model (``builtin:tiny``/``builtin:small``); LoRA-wrapped when ``cfg.lora_rank``."""
    torch.manual_seed(cfg.seed)
    if cfg.model in FRESH_MODELS:
        from posttrain.models.tiny import build_model, build_tokenizer

        tokenizer = build_tokenizer()
        model = build_model(
            tokenizer, size=FRESH_MODELS[cfg.model], seed=cfg.seed, max_positions=max(512, cfg.max_length)
        )
    else:
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        if hasattr(model, "merge_and_unload"):  # an adapter dir: train on base + adapter merged
            model = model.merge_and_unload()
    model.to(device)
    if getattr(cfg, "lora_rank", 0):
        model = add_lora(
            model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets
        )
    return model, tokenizer


def default_eval_data(data: str) -> str:
    """Held-out rows: the val split of a built-in task or of the corpus, else none.

    >>> default_eval_data("task:arithmetic"), default_eval_data("corpus"), default_eval_data("rows.jsonl")
    ('task:arithmetic:val', 'corpus:val', '')
    """
    if data.startswith("task:") and data.count(":") == 1:
        return data + ":val"
    return "corpus:val" if data == "corpus" else ""
