"""``posttrain rm``: a Bradley–Terry reward model, and reward-model scoring (one model or an ensemble).

The model is ``AutoModelForSequenceClassification`` (one label) over the causal LM's backbone: the reward of a
(prompt, reply) is the score head applied to the hidden state of the sequence's last token (the reply's EOS),
exactly where ``transformers`` pools, so the saved ``final/`` loads with plain ``transformers``:

    AutoModelForSequenceClassification.from_pretrained("runs/rm/final")

Loss per pair: -log sigma(r(chosen) - r(rejected) - margin), ``margin`` from the row's optional ``margin``
column (0 otherwise). Pairs are packed padding-free, chosen and rejected in one forward.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from posttrain.data.batching import ResumableSampler
from posttrain.data.encode import EncodeStats, Example, apply_length_policy, encode_row
from posttrain.data.rows import load_rows, validate_rows
from posttrain.distributed import peak_memory_mb, resolve_device
from posttrain.errors import ConfigError, DataError
from posttrain.losses.preference import bradley_terry_loss
from posttrain.models.loading import save_model_dir
from posttrain.rewards.model import load_reward_model, sequence_rewards
from posttrain.train.loop import (
    clip_and_step,
    close_step,
    count_step,
    make_optimizer,
    make_scheduler,
    restore_or_start,
    step_scheduler,
)
from posttrain.train.metrics import MetricsLog
from posttrain.train.stage import default_eval_data, prepare_run_dir


def encode_pairs(source: Any, tokenizer: Any, cfg: Any) -> tuple[list[tuple[Example, Example]], list[float], dict]:
    name = source if isinstance(source, str) else "<rows>"
    checked = validate_rows(load_rows(source), "preference", source=name)
    stats = EncodeStats()
    pairs, margins = [], []
    for row, line in zip(checked.rows, checked.lines):
        margin = row.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise DataError(name, line, "margin", f"expected a finite number, got {margin!r}")
        encoded = []
        for key in ("chosen", "rejected"):
            example = encode_row({"prompt": row["prompt"], "completion": row[key]}, tokenizer, completion_only=False)
            encoded.append(apply_length_policy(example, cfg.max_length, "drop", stats))
        if None not in encoded:
            pairs.append((encoded[0], encoded[1]))
            margins.append(float(margin))
    if not pairs:
        raise ConfigError(f"rm.max_length: no pair of {name} fits in {cfg.max_length} tokens")
    return pairs, margins, {"rows": len(checked.rows), "pairs": len(pairs), "dropped_too_long": stats.dropped}


def pair_rewards(model: Any, pairs: list[tuple[Example, Example]]) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = sequence_rewards(model, [e for pair in pairs for e in pair]).view(len(pairs), 2)
    return rewards[:, 0], rewards[:, 1]


@torch.no_grad()
def pair_accuracy(model: Any, pairs: list[tuple[Example, Example]], *, batch_size: int = 64) -> float:
    """Share of pairs whose chosen reply gets the higher reward."""
    was_training = model.training
    model.eval()
    right = 0
    for start in range(0, len(pairs), batch_size):
        chosen, rejected = pair_rewards(model, pairs[start : start + batch_size])
        right += int((chosen > rejected).sum())
    model.train(was_training)
    return right / len(pairs)


def run_rm(cfg: Any, *, stop_after: int | None = None) -> dict[str, Any]:
    """Train a reward model and write the run directory; returns the summary."""
    if cfg.lora_rank:
        raise ConfigError("rm.lora_rank: reward models train fully for now (the score head is new); use 0")
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"rm.grad_accum: must divide batch_size ({cfg.batch_size}), got {cfg.grad_accum}")
    run_dir = prepare_run_dir(cfg, "rm")
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_reward_model(cfg.model, dtype=cfg.dtype)
    model.to(resolve_device(cfg.device))
    pairs, margins, counts = encode_pairs(cfg.data, tokenizer, cfg)
    eval_source = cfg.eval_data or default_eval_data(cfg.data)
    eval_pairs = encode_pairs(eval_source, tokenizer, cfg)[0] if eval_source else []
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    sampler = ResumableSampler(len(pairs), seed=cfg.seed)
    log = MetricsLog(run_dir / "metrics.jsonl")
    state = {"step": 0, "skipped_steps": 0, "bad_in_row": 0, "sampler": sampler.state_dict()}
    state, resumed_from = restore_or_start(run_dir, cfg, model, optimizer, scheduler, sampler, log, state)
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="rm", disable=not cfg.progress, unit="step")
    while state["step"] < cfg.max_steps:
        step, t0 = state["step"] + 1, time.perf_counter()
        index = sampler.take(cfg.batch_size)
        totals = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
        for micro in range(cfg.grad_accum):
            part = index[micro :: cfg.grad_accum]
            chosen, rejected = pair_rewards(model, [pairs[i] for i in part])
            margin = torch.tensor([margins[i] for i in part], device=chosen.device)
            loss = bradley_terry_loss(chosen, rejected, margin)
            (loss.sum() / len(index)).backward()
            totals["loss"] += float(loss.detach().sum()) / len(index)
            totals["accuracy"] += float((chosen > rejected).sum()) / len(index)
            totals["margin"] += float((chosen - rejected).detach().sum()) / len(index)
        finite, grad_norm = clip_and_step(optimizer, params, cfg, totals["loss"])
        count_step(state, finite)
        lr = step_scheduler(scheduler)
        state.update(step=step, sampler=sampler.state_dict())
        record = {"step": step, "lr": lr, "grad_norm": float(grad_norm), **totals}
        record["step_s"] = round(time.perf_counter() - t0, 4)
        evaluated = bool(eval_pairs) and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps)
        if evaluated:
            record["eval_pair_accuracy"] = pair_accuracy(model, eval_pairs)
        common = dict(state=state, log=log, bar=bar, model=model, optimizer=optimizer, scheduler=scheduler)
        if close_step("rm", run_dir, cfg, record, finite=finite, evaluated=evaluated, stop_after=stop_after, **common):
            return {"stage": "rm", "steps": step, "stopped_early": True}
    bar.close()
    save_model_dir(model, tokenizer, run_dir / "final")
    metrics = log.read()
    last_eval = next((m for m in reversed(metrics) if "eval_pair_accuracy" in m), {})
    summary = {
        "stage": "rm",
        "model": cfg.model,
        "final": str(run_dir / "final"),
        "steps": state["step"],
        "skipped_steps": state["skipped_steps"],
        "resumed_from": resumed_from,
        **counts,
        "final_train_loss": metrics[-1].get("loss") if metrics else None,
        "heldout": {"pair_accuracy": last_eval.get("eval_pair_accuracy")},
        "wall_s": round(time.perf_counter() - started, 3),
        "peak_memory_mb": round(peak_memory_mb(), 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
