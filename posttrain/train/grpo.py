"""``posttrain grpo``: RL with verifiable rewards, GRPO and its family.

One step, top to bottom: take N prompts; sample G completions each with the rollout engine (shared prefill);
score them with the reward functions; turn each group's rewards into advantages; optionally drop zero-variance
groups (dynamic sampling); then one or more policy updates with the chosen clipped loss (plus a KL penalty to
the reference when ``kl_coef`` > 0). Sampling is seeded by (seed, step), so a resumed run samples exactly what
the uninterrupted run did. The maths lives in ``advantages.py`` and ``losses/``; this file only wires it up.
"""

from __future__ import annotations

import copy
import json
import random
import time
from contextlib import nullcontext
from typing import Any

import torch
from tqdm.auto import tqdm

from posttrain.advantages import ESTIMATORS, varied_groups
from posttrain.data.batching import ResumableSampler
from posttrain.data.encode import render_prompt
from posttrain.data.rows import load_rows, validate_rows
from posttrain.distributed import peak_memory_mb
from posttrain.errors import ConfigError, DataError
from posttrain.losses.kl import KL_ESTIMATORS
from posttrain.losses.policy import POLICY_LOSSES
from posttrain.losses.reduce import masked_sum
from posttrain.rewards import parse_rewards, score_completions
from posttrain.rewards.shaping import overlong_penalty
from posttrain.rewards.verify import generic_score
from posttrain.rollout import HFEngine, SamplingParams
from posttrain.rollout.scoring import completion_logps
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


def _prompt_rows(cfg: Any, tokenizer: Any) -> tuple[list[dict], int]:
    rows = validate_rows(load_rows(cfg.data), "prompt", source=cfg.data, skip_bad_rows=False).rows
    kept = [
        r
        for r in rows
        if len(tokenizer(render_prompt(r, tokenizer), add_special_tokens=False)["input_ids"]) <= cfg.max_length
    ]
    if not kept:
        raise ConfigError(f"grpo.max_length: all {len(rows)} prompts are longer than {cfg.max_length} tokens")
    return [{k: v for k, v in r.items() if k not in ("completion", "question")} for r in kept], len(rows) - len(kept)


def _eval_rows(cfg: Any) -> list[dict]:
    """Held-out rows for ``eval_every``: ``eval_data``, else the task's val split when training on a task."""
    if not cfg.eval_every:
        return []
    source = cfg.eval_data
    if not source:
        if not cfg.data.startswith("task:"):
            raise ConfigError("grpo.eval_data: eval_every needs held-out rows with answers (give eval_data)")
        source = "task:" + cfg.data.split(":")[1] + ":val"
    rows = validate_rows(load_rows(source), "prompt", source=source, skip_bad_rows=False).rows
    for i, row in enumerate(rows):
        if "answer" not in row:
            raise DataError(source, i + 1, "answer", "held-out rows for eval_every need an answer")
    return rows[: cfg.eval_limit]


def held_out_accuracy(engine: Any, rows: list[dict], max_new_tokens: int) -> dict[str, float]:
    """Greedy strict and lenient accuracy of the engine's model on ``rows`` (scored by ``generic_score``)."""
    prompts = [render_prompt(r, engine.tokenizer) for r in rows]
    out = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens), seed=0)
    scores = [generic_score(text, str(r["answer"])) for text, r in zip(out.texts, rows)]
    return {
        "eval_accuracy_strict": sum(s for s, _ in scores) / len(rows),
        "eval_accuracy_lenient": sum(le for _, le in scores) / len(rows),
    }


def _check(cfg: Any) -> None:
    for key in ("group_size", "batch_prompts", "max_new_tokens", "updates_per_batch", "max_steps", "grad_accum"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"grpo.{key}: must be at least 1, got {getattr(cfg, key)}")
    if cfg.kl_coef < 0:
        raise ConfigError(f"grpo.kl_coef: must be >= 0, got {cfg.kl_coef}")


def make_reference(model: Any, cfg: Any) -> Any:
    """The KL reference: none without KL; with LoRA none either (the base with adapters disabled serves, so no
    second copy is held); else a frozen copy of the starting model."""
    if cfg.kl_coef == 0 or cfg.lora_rank:
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


def rollout_model(model: Any, cfg: Any) -> Any:
    """The model the engine samples from: the trained model itself, or a copy in ``rollout_dtype``."""
    want = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.rollout_dtype]
    if want is None or next(model.parameters()).dtype == want:
        return model
    return copy.deepcopy(model).to(want).eval().requires_grad_(False)


@torch.no_grad()
def sync_weights(source: Any, target: Any) -> None:
    """Copy ``source``'s parameters and buffers into ``target`` (same architecture, any dtype)."""
    for a, b in zip(source.parameters(), target.parameters()):
        b.copy_(a)
    for a, b in zip(source.buffers(), target.buffers()):
        b.copy_(a)


def run_grpo(cfg: Any, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run GRPO (or a variant) and write the run directory; returns the summary. ``stop_after`` returns right
    after that step, as if the process had died there (for resume tests)."""
    _check(cfg)
    run_dir = prepare_run_dir(cfg, "grpo")
    started = time.perf_counter()
    specs = parse_rewards(cfg.reward, cfg.reward_weights)
    model, tokenizer = model_for_training(cfg, "grpo")
    rows, dropped = _prompt_rows(cfg, tokenizer)
    eval_rows = _eval_rows(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    reference = make_reference(model, cfg)
    policy = POLICY_LOSSES[cfg.loss]
    estimator = ESTIMATORS[
        ("dr_grpo" if cfg.loss == "dr_grpo" else "grpo") if cfg.advantage == "auto" else cfg.advantage
    ]
    eps = {"eps_low": cfg.epsilon_low or None, "eps_high": cfg.epsilon_high or None}
    params = SamplingParams(
        n=cfg.group_size,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens,
    )
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    sampler = ResumableSampler(len(rows), seed=cfg.seed)
    log = MetricsLog(run_dir / "metrics.jsonl")
    state = {"step": 0, "skipped_steps": 0, "bad_in_row": 0, "sampler": sampler.state_dict(), "reward_failures": 0}
    state, resumed_from = restore_or_start(run_dir, cfg, model, optimizer, scheduler, sampler, log, state)
    params_list = [p for p in model.parameters() if p.requires_grad]
    sampler_model = rollout_model(model, cfg)
    engine, eval_engine = HFEngine(sampler_model, tokenizer), HFEngine(model, tokenizer)
    if eval_rows and state["step"] == 0:
        log.write({"step": 0, **held_out_accuracy(eval_engine, eval_rows, cfg.max_new_tokens)})
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="grpo", disable=not cfg.progress, unit="step")
    while state["step"] < cfg.max_steps:
        step = state["step"] + 1
        step_started = time.perf_counter()
        batch_rows = [rows[i] for i in sampler.take(cfg.batch_prompts)]
        times: dict[str, float] = {}
        t = time.perf_counter()
        rollouts = engine.generate(
            [render_prompt(r, tokenizer) for r in batch_rows], params, seed=cfg.seed * 1_000_003 + step
        )
        times["generate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        per_completion = [batch_rows[i] for i in rollouts.prompt_index]
        scores = score_completions(
            specs, rollouts.texts, per_completion, timeout_s=cfg.reward_timeout_s, on_error=cfg.reward_on_error
        )
        rewards = scores.total + overlong_penalty(
            rollouts.lengths, max_tokens=cfg.max_new_tokens, buffer=cfg.overlong_buffer
        )
        grouped = rewards.view(cfg.batch_prompts, cfg.group_size)
        advantages = estimator(grouped).reshape(-1)
        varied = varied_groups(grouped)
        keep = (
            varied.repeat_interleave(cfg.group_size)
            if cfg.dynamic_sampling
            else torch.ones_like(rewards, dtype=torch.bool)
        )
        times["reward_s"] = time.perf_counter() - t
        record = update_policy(
            model, reference, rollouts, advantages, keep, cfg, policy, eps, optimizer, params_list, times
        )
        finite = record.pop("finite")
        if sampler_model is not model:
            sync_weights(model, sampler_model)
        count_step(state, finite)
        lr = step_scheduler(scheduler)
        state.update(step=step, sampler=sampler.state_dict(), reward_failures=state["reward_failures"] + scores.failed)
        strict = [generic_score(c, str(r["answer"])) for c, r in zip(rollouts.texts, per_completion) if "answer" in r]
        record.update(
            step=step,
            lr=lr,
            reward_mean=float(rewards.mean()),
            reward_std=float(rewards.std()),
            **{f"reward_{k}": float(v.mean()) for k, v in scores.per_function.items()},
            accuracy_strict=sum(s for s, _ in strict) / len(strict) if strict else None,
            accuracy_lenient=sum(le for _, le in strict) / len(strict) if strict else None,
            completion_length=float(rollouts.lengths.float().mean()),
            zero_std_fraction=float(1 - varied.float().mean()),
            reward_failures=state["reward_failures"],
            skipped_steps=state["skipped_steps"],
            **{k: round(v, 4) for k, v in times.items()},
            step_s=round(time.perf_counter() - step_started, 4),
        )
        evaluated = bool(eval_rows) and (step % cfg.eval_every == 0 or step == cfg.max_steps)
        if evaluated:
            record.update(held_out_accuracy(eval_engine, eval_rows, cfg.max_new_tokens))
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
        common = dict(state=state, log=log, bar=bar, model=model, optimizer=optimizer, scheduler=scheduler)
        if close_step(
            "grpo", run_dir, cfg, record, finite=finite, evaluated=evaluated, stop_after=stop_after, **common
        ):
            return {"stage": "grpo", "steps": step, "stopped_early": True}
    bar.close()
    save_model_dir(model, tokenizer, run_dir / "final")
    metrics = log.read()
    summary = {
        "stage": "grpo",
        "model": cfg.model,
        "final": str(run_dir / "final"),
        "lora": bool(cfg.lora_rank),
        "loss": cfg.loss,
        "steps": state["step"],
        "skipped_steps": state["skipped_steps"],
        "resumed_from": resumed_from,
        "prompts": len(rows),
        "dropped_long_prompts": dropped,
        "reward_failures": state["reward_failures"],
        "final_reward_mean": metrics[-1].get("reward_mean") if metrics else None,
        "eval_accuracy_strict": metrics[-1].get("eval_accuracy_strict") if eval_rows else None,
        "wall_s": round(time.perf_counter() - started, 3),
        "peak_memory_mb": round(peak_memory_mb(), 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def update_policy(
    model: Any,
    reference: Any,
    rollouts: Any,
    advantages: torch.Tensor,
    keep: torch.Tensor,
    cfg: Any,
    policy: Any,
    eps: dict,
    optimizer: Any,
    params: list,
    times: dict,
) -> dict[str, Any]:
    """Reference and old log-probs, then ``updates_per_batch`` clipped policy updates over the kept completions."""
    rows = keep.nonzero().squeeze(-1).tolist()
    record: dict[str, Any] = {"finite": True, "kept_completions": len(rows)}
    device = next(model.parameters()).device
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")  # noqa: E731
    if not rows:  # every group had equal rewards: nothing to learn from this batch
        record.update(
            loss=0.0, kl=0.0, clip_fraction=0.0, entropy=None, logp_diff_max=None, update_s=0.0, reference_s=0.0
        )
        return record
    t = time.perf_counter()
    ref_logps = None
    if cfg.kl_coef > 0:
        with torch.no_grad(), amp(), model.disable_adapter() if reference is None else nullcontext():
            ref_logps = completion_logps(reference or model, rollouts, temperature=cfg.temperature, rows=rows)
    old_logps = None
    if cfg.updates_per_batch > 1:
        with torch.no_grad(), amp():
            old_logps = completion_logps(model, rollouts, temperature=cfg.temperature, rows=rows)
    times["reference_s"] = time.perf_counter() - t
    t = time.perf_counter()
    mask, adv = rollouts.mask[rows], advantages[rows]
    chunks = [list(range(len(rows)))[i :: cfg.grad_accum] for i in range(cfg.grad_accum)]
    chunks = [c for c in chunks if c]
    for update in range(cfg.updates_per_batch):
        totals = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "entropy": 0.0}
        for chunk in chunks:
            sub = [rows[i] for i in chunk]
            with amp():
                logps, entropy = completion_logps(
                    model, rollouts, temperature=cfg.temperature, rows=sub, with_entropy=True
                )
            if update == 0:
                # One engine samples and trains: any real gap between its log-probs and ours is a bug signal.
                gap = (logps.detach() - rollouts.logps[sub]).abs()[mask[chunk]]
                record["logp_diff_max"] = max(record.get("logp_diff_max", 0.0), float(gap.max()))
            old = logps.detach() if old_logps is None else old_logps[chunk]
            loss, stats = policy(logps, old, adv[chunk], mask[chunk], max_tokens=cfg.max_new_tokens, **eps)
            kl_value = 0.0
            if ref_logps is not None:
                kl = KL_ESTIMATORS[cfg.kl_estimator](logps, ref_logps[chunk])
                loss = loss + cfg.kl_coef * policy.reduce(kl, mask[chunk], max_tokens=cfg.max_new_tokens)
                kl_value = float(masked_sum(kl.detach(), mask[chunk]) / mask[chunk].sum().clamp(min=1))
            weight = len(chunk) / len(rows)
            (loss * weight).backward()
            totals["loss"] += float(loss.detach()) * weight
            totals["kl"] += kl_value * weight
            totals["clip_fraction"] += float(stats["clip_fraction"]) * weight
            totals["entropy"] += float(masked_sum(entropy, mask[chunk]) / mask[chunk].sum().clamp(min=1)) * weight
        finite, grad_norm = clip_and_step(optimizer, params, cfg, totals["loss"])
        record["finite"] = record["finite"] and finite
        record.update(totals, grad_norm=float(grad_norm))
    times["update_s"] = time.perf_counter() - t
    return record
