"""``posttrain dpo``: preference optimisation (DPO, cDPO, IPO, SimPO, ORPO on pairs; KTO on unpaired rows).

One step: take B rows; pack every chosen and rejected (or labelled) sequence of the batch into one
padding-free row; one forward gives each sequence's summed completion log-prob; the loss of
``posttrain.losses.preference`` compares them with the reference's. The reference log-probs are computed once,
before the first step, by the starting model (with LoRA: the base with adapters disabled) for every row the
run's deterministic sampler will visit, and saved to the run directory, so no reference model is kept in
memory and a resumed run uses exactly the same numbers. Reference-free losses (SimPO, ORPO) skip that pass.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from posttrain.data.batching import ResumableSampler, pack
from posttrain.data.encode import EncodeStats, Example, apply_length_policy, encode_row
from posttrain.data.rows import load_rows, validate_rows
from posttrain.distributed import peak_memory_mb
from posttrain.errors import ConfigError
from posttrain.losses.logprobs import token_logps
from posttrain.losses.preference import PAIRED_LOSSES, REFERENCE_FREE, kto_loss
from posttrain.models.varlen import packed_attention
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
from posttrain.train.stage import model_for_training, prepare_run_dir, save_model_dir


def encode_pairs(source: Any, tokenizer: Any, cfg: Any) -> tuple[list[tuple[Example, ...]], list[bool], dict]:
    """Rows -> per row (chosen, rejected) examples (kto: (completion,) and its label), completion-only masks."""
    kto = cfg.loss == "kto"
    name = source if isinstance(source, str) else "<rows>"
    checked = validate_rows(load_rows(source), "unpaired" if kto else "preference", source=name)
    stats = EncodeStats()
    items, labels = [], []
    for row in checked.rows:
        keys = ("completion",) if kto else ("chosen", "rejected")
        examples = []
        for key in keys:
            example = encode_row({"prompt": row["prompt"], "completion": row[key]}, tokenizer)
            example = apply_length_policy(example, cfg.max_length, cfg.length_policy, stats)
            if example is None:
                break
            examples.append(example)
        if len(examples) == len(keys):
            items.append(tuple(examples))
            labels.append(bool(row.get("label", True)))
    if not items:
        raise ConfigError(f"dpo.max_length: no row of {name} fits in {cfg.max_length} tokens")
    return items, labels, {"rows": len(checked.rows), "pairs": len(items), "dropped_too_long": stats.dropped}


def sequence_logps(model: Any, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion-token log-probs (n,) and completion lengths (n,) of ``examples``, one packed forward."""
    device = next(model.parameters()).device
    batch = pack(examples).to(device)
    with packed_attention(model):
        logits = model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, posttrain_bounds=batch.bounds, use_cache=False
        ).logits
    logps = token_logps(logits, batch.targets)[0] * batch.target_mask[0]
    n = len(examples)
    sums = torch.zeros(n, dtype=logps.dtype, device=device).index_add(0, batch.seq_ids[0], logps)
    lengths = torch.zeros(n, device=device).index_add(0, batch.seq_ids[0], batch.target_mask[0].float())
    return sums, lengths.clamp(min=1)


@torch.no_grad()
def reference_logps(
    model: Any, items: list[tuple[Example, ...]], cfg: Any, *, rows: list[int] | None = None, batch_size: int = 64
) -> torch.Tensor:
    """(rows, sequences per row) reference log-probs of the starting model (adapters disabled under LoRA) for
    ``rows`` (default all); rows not computed are NaN."""
    was_training = model.training
    model.eval()
    rows = list(range(len(items))) if rows is None else rows
    out = torch.full((len(items), len(items[0])), math.nan)
    adapters_off = model.disable_adapter() if cfg.lora_rank else nullcontext()
    with adapters_off:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            sums, _ = sequence_logps(model, [e for i in chunk for e in items[i]])
            out[chunk] = sums.view(len(chunk), -1).float().cpu()
    model.train(was_training)
    return out


def visited_rows(size: int, cfg: Any) -> list[int]:
    """Every row index the run's sampler will hand out in ``max_steps`` steps (the sampler is deterministic)."""
    sampler = ResumableSampler(size, seed=cfg.seed)
    return sorted({i for _ in range(cfg.max_steps) for i in sampler.take(cfg.batch_size)})


def preference_loss(
    model: Any, items: list[tuple[Example, ...]], labels: list[bool], ref: torch.Tensor | None, cfg: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row loss (B,) and stats for a batch of rows (see ``posttrain.losses.preference``)."""
    per_row = len(items[0])
    sums, lengths = sequence_logps(model, [e for item in items for e in item])
    sums, lengths = sums.view(len(items), per_row), lengths.view(len(items), per_row)
    device = sums.device
    if cfg.loss == "kto":
        return kto_loss(
            sums[:, 0],
            ref[:, 0].to(device),
            torch.tensor(labels, device=device),
            beta=cfg.beta,
            desirable_weight=cfg.desirable_weight,
            undesirable_weight=cfg.undesirable_weight,
        )
    rc, rr = (None, None) if ref is None else (ref[:, 0].to(device), ref[:, 1].to(device))
    return PAIRED_LOSSES[cfg.loss](
        sums[:, 0],
        sums[:, 1],
        rc,
        rr,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        gamma=cfg.gamma,
        chosen_lengths=lengths[:, 0],
        rejected_lengths=lengths[:, 1],
    )


def _check(cfg: Any) -> None:
    if cfg.beta <= 0:
        raise ConfigError(f"dpo.beta: must be > 0, got {cfg.beta}")
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"dpo.grad_accum: must divide batch_size ({cfg.batch_size}), got {cfg.grad_accum}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing: must be in [0, 0.5), got {cfg.label_smoothing}")


@torch.no_grad()
def held_out(model: Any, items: list, labels: list[bool], ref: torch.Tensor | None, cfg: Any) -> dict[str, float]:
    """Mean loss and preference accuracy (implicit chosen reward > rejected) on held-out rows."""
    was_training = model.training
    model.eval()
    losses, correct = [], []
    for start in range(0, len(items), 64):
        chunk = items[start : start + 64]
        sub_ref = None if ref is None else ref[start : start + 64]
        loss, stats = preference_loss(model, chunk, labels[start : start + 64], sub_ref, cfg)
        losses += loss.tolist()
        correct += stats["accuracy"].tolist() if "accuracy" in stats else []
    model.train(was_training)
    out = {"eval_loss": sum(losses) / len(losses)}
    if correct:
        out["eval_preference_accuracy"] = sum(correct) / len(correct)
    return out


def run_dpo(cfg: Any, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run preference optimisation and write the run directory; returns the summary."""
    _check(cfg)
    run_dir = prepare_run_dir(cfg, "dpo")
    started = time.perf_counter()
    model, tokenizer = model_for_training(cfg, "dpo")
    items, labels, counts = encode_pairs(cfg.data, tokenizer, cfg)
    eval_source = cfg.eval_data or (
        cfg.data + ":val" if cfg.data.startswith("task:") and cfg.data.count(":") == 1 else ""
    )
    eval_items, eval_labels = ([], [])
    if eval_source:
        eval_items, eval_labels, _ = encode_pairs(eval_source, tokenizer, cfg)
    needs_ref = cfg.loss not in REFERENCE_FREE
    ref_path = run_dir / "reference_logps.safetensors"
    ref = eval_ref = None
    if needs_ref:
        if cfg.resume and ref_path.is_file():
            saved = load_file(str(ref_path))
            ref, eval_ref = saved["train"], saved.get("eval")
        else:
            # Only the rows this run will visit: the same numbers, without a pass over the whole data set.
            ref = reference_logps(model, items, cfg, rows=visited_rows(len(items), cfg))
            eval_ref = reference_logps(model, eval_items, cfg) if eval_items else None
            tensors = {"train": ref, **({"eval": eval_ref} if eval_ref is not None else {})}
            save_file(tensors, str(ref_path))
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    sampler = ResumableSampler(len(items), seed=cfg.seed)
    log = MetricsLog(run_dir / "metrics.jsonl")
    state = {"step": 0, "skipped_steps": 0, "bad_in_row": 0, "sampler": sampler.state_dict()}
    state, resumed_from = restore_or_start(run_dir, cfg, model, optimizer, scheduler, sampler, log, state)
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="dpo", disable=not cfg.progress, unit="step")
    while state["step"] < cfg.max_steps:
        step, t0 = state["step"] + 1, time.perf_counter()
        index = sampler.take(cfg.batch_size)
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            part = index[micro :: cfg.grad_accum]
            sub_ref = None if ref is None else ref[part]
            loss, stats = preference_loss(model, [items[i] for i in part], [labels[i] for i in part], sub_ref, cfg)
            (loss.sum() / len(index)).backward()
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach().sum()) / len(index)
            for key, value in stats.items():
                if value.dim():
                    totals[key] = totals.get(key, 0.0) + float(value.sum()) / len(index)
        finite, grad_norm = clip_and_step(optimizer, params, cfg, totals["loss"])
        count_step(state, finite)
        lr = step_scheduler(scheduler)
        state.update(step=step, sampler=sampler.state_dict())
        record = {"step": step, "lr": lr, "grad_norm": float(grad_norm), **totals}
        record["step_s"] = round(time.perf_counter() - t0, 4)
        evaluated = bool(eval_items) and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps)
        if evaluated:
            record.update(held_out(model, eval_items, eval_labels, eval_ref, cfg))
        bar.set_postfix(loss=f"{totals['loss']:.4f}")
        common = dict(state=state, log=log, bar=bar, model=model, optimizer=optimizer, scheduler=scheduler)
        if close_step("dpo", run_dir, cfg, record, finite=finite, evaluated=evaluated, stop_after=stop_after, **common):
            return {"stage": "dpo", "steps": step, "stopped_early": True}
    bar.close()
    save_model_dir(model, tokenizer, run_dir / "final")
    metrics = log.read()
    last_eval = next((m for m in reversed(metrics) if "eval_loss" in m), {})
    summary = {
        "stage": "dpo",
        "model": cfg.model,
        "final": str(run_dir / "final"),
        "loss": cfg.loss,
        "lora": bool(cfg.lora_rank),
        "steps": state["step"],
        "skipped_steps": state["skipped_steps"],
        "resumed_from": resumed_from,
        **counts,
        "final_train_loss": metrics[-1].get("loss") if metrics else None,
        "heldout": {k: v for k, v in last_eval.items() if k.startswith("eval_")},
        "wall_s": round(time.perf_counter() - started, 3),
        "peak_memory_mb": round(peak_memory_mb(), 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def load_reference(run_dir: Path) -> dict[str, torch.Tensor]:
    """The reference log-probs a DPO run saved (``train`` and, if any, ``eval``)."""
    return load_file(str(Path(run_dir) / "reference_logps.safetensors"))
