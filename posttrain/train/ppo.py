"""``posttrain ppo``: PPO with a value head, GAE, a KL penalty in the reward and a KL trust region.

One step: sample ``samples_per_prompt`` completions for N prompts with the rollout engine; score them (verifier
functions or a reward model, ``--reward rm:DIR``); per token, reward = -kl_coef x (log pi - log pi_ref) and the
score is added at the last token; values from a linear head on the policy's last hidden state; GAE advantages
(whitened) and returns; then ``ppo_epochs`` passes over ``minibatches`` shuffled minibatches with the clipped
surrogate and the clipped value loss. The KL coefficient is fixed or adaptive (target KL, horizon). With
``trust_region_kl`` > 0 an epoch stops as soon as the mean KL between the rollout policy and the current one
exceeds it (TRPO-style constraint). Checkpoints hold the value head and the KL controller, so resume is exact.
The maths lives in ``posttrain.losses.ppo``; this file wires it up.
"""

from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from posttrain.data.batching import ResumableSampler
from posttrain.data.encode import render_prompt
from posttrain.distributed import peak_memory_mb
from posttrain.errors import ConfigError
from posttrain.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_value_loss,
    gae,
    kl_exceeds,
    shaped_rewards,
    token_surrogate,
    whiten,
)
from posttrain.rewards import parse_rewards, score_completions
from posttrain.rewards.verify import generic_score
from posttrain.rollout import HFEngine, SamplingParams
from posttrain.rollout.scoring import completion_logps
from posttrain.train.grpo import _prompt_rows, make_reference
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


class PolicyWithValue(torch.nn.Module):
    """The policy and its value head as one module, so one optimiser and one checkpoint hold both."""

    def __init__(self, policy: Any, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.normal_(self.value_head.weight, std=0.02)
        torch.nn.init.zeros_(self.value_head.bias)


def _hidden_size(model: Any) -> int:
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return config.get_text_config().hidden_size if hasattr(config, "get_text_config") else config.hidden_size


def logps_and_values(
    pv: PolicyWithValue, rollouts: Any, rows: list[int], temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, T) log-probs of the sampled tokens and (b, T) values of the states that chose them."""
    logps, hidden = completion_logps(pv.policy, rollouts, temperature=temperature, rows=rows, return_hidden=True)
    flat = pv.value_head(hidden.to(pv.value_head.weight.dtype)).squeeze(-1).float()
    values = torch.zeros_like(logps).masked_scatter(rollouts.mask[rows], flat)
    return logps, values


def _check(cfg: Any) -> None:
    for key in ("batch_prompts", "samples_per_prompt", "ppo_epochs", "minibatches", "max_new_tokens"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"ppo.{key}: must be at least 1, got {getattr(cfg, key)}")
    if (cfg.batch_prompts * cfg.samples_per_prompt) % cfg.minibatches:
        raise ConfigError("ppo.minibatches: must divide batch_prompts x samples_per_prompt")
    if cfg.kl_coef < 0 or (cfg.kl_controller == "adaptive" and cfg.kl_target <= 0):
        raise ConfigError("ppo.kl_coef must be >= 0 and ppo.kl_target > 0 for the adaptive controller")


def run_ppo(cfg: Any, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run PPO and write the run directory; returns the summary."""
    _check(cfg)
    run_dir = prepare_run_dir(cfg, "ppo")
    started = time.perf_counter()
    specs = parse_rewards(cfg.reward, cfg.reward_weights)
    policy, tokenizer = model_for_training(cfg, "ppo")
    rows, dropped = _prompt_rows(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    reference = make_reference(policy, cfg)
    pv = PolicyWithValue(policy, _hidden_size(policy)).to(next(policy.parameters()).device)
    controller: Any = (
        AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.kl_controller == "adaptive"
        else FixedKLController(cfg.kl_coef)
    )
    params = SamplingParams(n=cfg.samples_per_prompt, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    optimizer = make_optimizer(pv, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    sampler = ResumableSampler(len(rows), seed=cfg.seed)
    log = MetricsLog(run_dir / "metrics.jsonl")
    state = {"step": 0, "skipped_steps": 0, "bad_in_row": 0, "sampler": sampler.state_dict()}
    state["kl_controller"] = controller.state_dict()
    state, resumed_from = restore_or_start(run_dir, cfg, pv, optimizer, scheduler, sampler, log, state)
    controller.load_state_dict(state["kl_controller"])
    engine = HFEngine(policy, tokenizer)
    trainable = [p for p in pv.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="ppo", disable=not cfg.progress, unit="step")
    while state["step"] < cfg.max_steps:
        step, t0 = state["step"] + 1, time.perf_counter()
        batch_rows = [rows[i] for i in sampler.take(cfg.batch_prompts)]
        rollouts = engine.generate(
            [render_prompt(r, tokenizer) for r in batch_rows], params, seed=cfg.seed * 1_000_003 + step
        )
        per_completion = [batch_rows[i] for i in rollouts.prompt_index]
        scores = score_completions(
            specs, rollouts.texts, per_completion, timeout_s=cfg.reward_timeout_s, on_error=cfg.reward_on_error
        ).total.float()
        b, mask = len(rollouts.texts), rollouts.mask
        everyone = list(range(b))
        with torch.no_grad():
            old_logps, old_values = logps_and_values(pv, rollouts, everyone, cfg.temperature)
            kl_tokens = torch.zeros_like(old_logps)
            if cfg.kl_coef > 0:
                with policy.disable_adapter() if reference is None else nullcontext():
                    ref_logps = completion_logps(reference or policy, rollouts, temperature=cfg.temperature)
                kl_tokens = (old_logps - ref_logps) * mask
            rewards = shaped_rewards(scores, kl_tokens, mask, kl_coef=controller.value)
            advantages, returns = gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
            if cfg.whiten_advantages:
                advantages = whiten(advantages, mask)
        generator = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
        size = b // cfg.minibatches
        totals = {"pg_loss": 0.0, "vf_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
        updates, stopped, finite = 0, False, True
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(b, generator=generator).tolist()
            for start in range(0, b, size):
                mb = order[start : start + size]
                m = mask[mb]
                logps, values = logps_and_values(pv, rollouts, mb, cfg.temperature)
                n_tok = m.sum().clamp(min=1)
                approx_kl = float(((old_logps[mb] - logps.detach()) * m).sum() / n_tok)
                if updates and kl_exceeds(approx_kl, cfg.trust_region_kl):
                    stopped = True  # the policy left the trust region: no more updates on this batch
                    break
                ratio = torch.exp(logps.detach() - old_logps[mb])
                pg_loss = token_surrogate(logps, old_logps[mb], advantages[mb], m, clip=cfg.clip_eps).sum() / n_tok
                vf_loss = clipped_value_loss(values, old_values[mb], returns[mb], m, clip=cfg.value_clip).sum() / n_tok
                loss = pg_loss + cfg.vf_coef * vf_loss
                loss.backward()
                finite = clip_and_step(optimizer, trainable, cfg, float(loss.detach()))[0] and finite
                updates += 1
                clipped = ((ratio - 1).abs() > cfg.clip_eps) & m
                for key, value in (
                    ("pg_loss", pg_loss.detach()),
                    ("vf_loss", vf_loss.detach()),
                    ("approx_kl", approx_kl),
                ):
                    totals[key] += float(value)
                totals["clip_fraction"] += float(clipped.sum() / n_tok)
            if stopped:
                break
        rollout_kl = float(kl_tokens.sum(-1).mean())
        coef_used = controller.value
        controller.update(rollout_kl, n_steps=b)
        count_step(state, finite)
        lr = step_scheduler(scheduler)
        state.update(step=step, sampler=sampler.state_dict(), kl_controller=controller.state_dict())
        strict = [
            generic_score(c, str(r["answer"]))[0] for c, r in zip(rollouts.texts, per_completion) if "answer" in r
        ]
        record = {
            "step": step,
            "lr": lr,
            "score_mean": float(scores.mean()),
            "reward_mean": float(rewards.sum(-1).mean()),
            "kl": rollout_kl,
            "kl_coef": coef_used,
            "updates": updates,
            "trust_region_stop": stopped,
            "accuracy_strict": sum(strict) / len(strict) if strict else None,
            "completion_length": float(mask.sum(-1).float().mean()),
            "value_mean": float((old_values * mask).sum() / mask.sum()),
            **{k: v / max(updates, 1) for k, v in totals.items()},
            "step_s": round(time.perf_counter() - t0, 4),
        }
        common = dict(state=state, log=log, bar=bar, model=pv, optimizer=optimizer, scheduler=scheduler)
        if close_step("ppo", run_dir, cfg, record, finite=finite, evaluated=False, stop_after=stop_after, **common):
            return {"stage": "ppo", "steps": step, "stopped_early": True}
    bar.close()
    save_model_dir(policy, tokenizer, run_dir / "final")
    save_file(
        {k: v.contiguous() for k, v in pv.value_head.state_dict().items()}, str(run_dir / "value_head.safetensors")
    )
    metrics = log.read()
    summary = {
        "stage": "ppo",
        "model": cfg.model,
        "final": str(run_dir / "final"),
        "steps": state["step"],
        "skipped_steps": state["skipped_steps"],
        "resumed_from": resumed_from,
        "prompts": len(rows),
        "dropped_long_prompts": dropped,
        "final_score_mean": metrics[-1]["score_mean"] if metrics else None,
        "kl_coef": controller.value,
        "wall_s": round(time.perf_counter() - started, 3),
        "peak_memory_mb": round(peak_memory_mb(), 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
