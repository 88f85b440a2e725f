"""The ``pretrain`` and ``sft`` stages: config in, run directory out (DESIGN.md, "Run directory").

>>> import tempfile
>>> from posttrain.config import build_config, SFTConfig
>>> out = tempfile.mkdtemp()
>>> cfg = build_config(SFTConfig, {"out": out, "max_steps": 2, "batch_size": 2, "progress": False,
...                                "lr": 1e-3}, path="sft")
>>> summary = run_sft(cfg)
>>> summary["steps"], sorted(p.name for p in Path(out).iterdir())
(2, ['checkpoints', 'config.yaml', 'final', 'metrics.jsonl', 'summary.json'])
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from posttrain.config import to_dict
from posttrain.data.prepare import mix_replay, prepare_examples
from posttrain.distributed import peak_memory_mb, resolve_device
from posttrain.errors import ConfigError
from posttrain.models.loading import load_model, save_model_dir
from posttrain.models.lora import add_lora
from posttrain.train.loop import train

FRESH_MODELS = {"builtin:tiny": "tiny", "builtin:small": "small"}


def prepare_run_dir(cfg: Any, stage: str) -> Path:
    if not cfg.out:
        raise ConfigError(f"{stage}.out: a run directory is required (--out DIR)")
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"stage": stage, **to_dict(cfg)}, sort_keys=False))
    return run_dir


def model_for_training(cfg: Any, stage: str) -> tuple[Any, Any]:
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
    model.to(resolve_device(cfg.device))
    if cfg.lora_rank < 0:
        raise ConfigError(f"{stage}.lora_rank: must be >= 0, got {cfg.lora_rank}")
    if cfg.lora_rank:
        model = add_lora(
            model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets
        )
    return model, tokenizer


def default_eval_data(data: str) -> str:
    """Held-out rows for the eval loss: the val split of a built-in task or corpus, else none."""
    if data.startswith("task:") and data.count(":") == 1:
        return data + ":val"
    return "corpus:val" if data == "corpus" else ""


def run_lm_stage(cfg: Any, *, stage: str) -> dict[str, Any]:
    """Train with the causal-LM loss (on completions for SFT, on everything for pretraining) and write the run."""
    run_dir = prepare_run_dir(cfg, stage)
    started = time.perf_counter()
    model, tokenizer = model_for_training(cfg, stage)
    kind = "text" if stage == "pretrain" else "sft"
    common = dict(
        max_length=cfg.max_length,
        length_policy=cfg.length_policy,
        completion_only=cfg.completion_only_loss,
        skip_bad_rows=cfg.skip_bad_rows,
        run_dir=run_dir,
    )
    data = prepare_examples(cfg.data, tokenizer, kind=kind, **common)
    examples = data.examples
    if cfg.replay_fraction and not cfg.replay_data:
        raise ConfigError(f"{stage}.replay_data: replay_fraction={cfg.replay_fraction} needs replay_data")
    if not 0.0 <= cfg.replay_fraction < 1.0:
        raise ConfigError(f"{stage}.replay_fraction: must be in [0, 1), got {cfg.replay_fraction}")
    replay = None
    if cfg.replay_data and cfg.replay_fraction:
        replay = prepare_examples(cfg.replay_data, tokenizer, kind="sft", label="replay", **common)
        examples = mix_replay(examples, replay.examples, cfg.replay_fraction, seed=cfg.seed)
    eval_source = cfg.eval_data or default_eval_data(cfg.data)
    eval_data = prepare_examples(eval_source, tokenizer, kind=kind, label="eval", **common) if eval_source else None
    result = train(model, examples, cfg, run_dir, eval_examples=eval_data.examples if eval_data else (), stage=stage)
    save_model_dir(model, tokenizer, run_dir / "final")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = {
        "stage": stage,
        "model": cfg.model,
        "final": str(run_dir / "final"),
        "lora": bool(cfg.lora_rank),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": trainable,
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "resumed_from": result.resumed_from,
        "final_train_loss": result.final_loss,
        "heldout": result.eval,
        "train_wall_s": round(result.wall_s, 3),
        "wall_s": round(time.perf_counter() - started, 3),
        "tokens": result.tokens,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "data": data.summary(),
        "replay": {"source": cfg.replay_data, "examples": len(examples) - len(data.examples)} if replay else None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_sft(cfg: Any) -> dict[str, Any]:
    """Supervised fine-tuning (full or LoRA); see module docstring."""
    return run_lm_stage(cfg, stage="sft")


def run_pretrain(cfg: Any) -> dict[str, Any]:
    """Causal-LM pretraining (from scratch with ``model: builtin:tiny``) or continued pretraining."""
    return run_lm_stage(cfg, stage="pretrain")
