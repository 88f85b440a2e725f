"""The model a stage trains: loaded (or freshly built), on its device, with LoRA adapters when asked."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from posttrain.config import DEFAULT_LORA_RANK, adapter_method
from posttrain.errors import ConfigError
from posttrain.models.loading import adapter_type, load_model, resolve, save_model_dir
from posttrain.models.lora import add_adapters
from posttrain.models.templates import use_chat_template
from posttrain.models.virtual import CONTINUED

FRESH_MODELS = {"builtin:tiny": "tiny", "builtin:small": "small"}


def model_for_training(cfg: Any, device: torch.device) -> tuple[Any, Any]:
    """(model, tokenizer) for ``cfg.model``: an HF dir, an adapter dir (merged into its base and trained on), a
    builtin, or a fresh random model (``builtin:tiny``/``builtin:small``); wrapped in peft adapters when the
    config asks for a peft method (:func:`posttrain.config.adapter_method`).

    Adapters trained on top of an earlier adapter stage would name the raw base in their ``adapter_config.json``
    and silently drop the earlier stage when loaded; so the merged base is saved to ``OUT/base/`` (rank 0) and the
    new adapters name it: the result loads as trained."""
    torch.manual_seed(cfg.seed)
    stacked = False
    method = adapter_method(cfg)
    if cfg.model not in FRESH_MODELS:
        _refuse_quantized(cfg.model)
    if cfg.model not in FRESH_MODELS and adapter_type(resolve(cfg.model)) in VIRTUAL_TYPES:
        return _continue_virtual(cfg, method, device)
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
            stacked = True
    tokenizer = use_chat_template(tokenizer, getattr(cfg, "chat_template", ""), key="model.chat_template")
    if method is not None and stacked and cfg.out:
        base = Path(cfg.out) / "base"
        if int(os.environ.get("RANK", "0")) == 0:
            save_model_dir(model, tokenizer, base)
        model.name_or_path = model.config._name_or_path = str(base.resolve())  # what peft records as the base
    if method == "qlora":  # the same weights (the merged base when stacked), linear layers stored as 4-bit NF4
        # fresh or merged weights go through a per-process temporary save (OUT/base is rank 0's, maybe not yet written)
        source = None if cfg.model in FRESH_MODELS or stacked else cfg.model
        model = _four_bit(cfg, source, model, device)
    model.to(device)
    if method is not None:
        rank = cfg.lora_rank or DEFAULT_LORA_RANK
        model = add_adapters(
            model,
            "lora" if method == "qlora" else method,
            rank=rank,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            targets=cfg.lora_targets,
            virtual_tokens=cfg.virtual_tokens,
        )
    return model, tokenizer


def _four_bit(cfg: Any, source: str | None, model: Any, device: torch.device) -> Any:
    """``model`` loaded again from ``source`` (its model spec or directory; None: a fresh model, saved to a
    temporary directory first) with its linear layers in 4-bit NF4 (``posttrain.models.quant``). The adapter
    records the full-precision base, which is where it merges."""
    from posttrain.models.quant import load_4bit

    if cfg.fsdp:
        raise ConfigError("peft: qlora does not shard under fsdp (bitsandbytes 4-bit weights): use DDP (fsdp false)")
    name = model.name_or_path
    with tempfile.TemporaryDirectory(prefix="posttrain-qlora-") as scratch:
        if source is None:
            model.save_pretrained(scratch)
        four = load_4bit(
            source or scratch, dtype=cfg.dtype, device=str(device), trust_remote_code=cfg.trust_remote_code
        )
    four.name_or_path = name
    return four


VIRTUAL_TYPES = {"PROMPT_TUNING": "prompt", "P_TUNING": "prompt", "PREFIX_TUNING": "prefix"}


def _continue_virtual(cfg: Any, method: str | None, device: torch.device) -> tuple[Any, Any]:
    """A stage started from a prompt/prefix adapter: its virtual tokens cannot be folded into the weights, so the
    stage goes on training that adapter (same method); anything else would silently drop it."""
    kind = VIRTUAL_TYPES[adapter_type(resolve(cfg.model))]
    if method != kind:
        raise ConfigError(
            f"model: {cfg.model} is a {kind}-tuning adapter, which cannot be merged into the weights; a stage started"
            f" from it goes on training it: set peft: {kind} (got {method or 'none'})"
        )
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, trainable=True)
    tokenizer = use_chat_template(tokenizer, getattr(cfg, "chat_template", ""), key="model.chat_template")
    setattr(model, CONTINUED, True)
    return model.to(device), tokenizer


def _refuse_quantized(spec: str) -> None:
    """Training updates full-precision weights: a quantized model (``posttrain quantize``) is refused by name."""
    from posttrain.models.quant import quantization_of

    config = quantization_of(resolve(spec))
    if config is not None:
        raise ConfigError(
            f"model: {spec} is quantized ({config.get('quant_method', '?')}); training needs full-precision weights:"
            " train the model it was quantized from and quantize the result (for 4-bit adapters: peft: qlora)"
        )


def default_eval_data(data: str) -> str:
    """Held-out rows: the val split of a built-in task or of the corpus, else none.

    >>> default_eval_data("task:arithmetic"), default_eval_data("corpus"), default_eval_data("rows.jsonl")
    ('task:arithmetic:val', 'corpus:val', '')
    """
    if data.startswith("task:") and data.count(":") == 1:
        return data + ":val"
    return "corpus:val" if data == "corpus" else ""
