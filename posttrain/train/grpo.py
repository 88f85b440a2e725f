"""``posttrain grpo``: RL with verifiable rewards, GRPO and its family.

One step, top to bottom: take N prompts (each rank a whole-group share); sample G completions each with the
rollout engine (shared prefill, seeded per prompt); score them with the reward functions; gather every rank's
rewards and turn each group's into advantages (batch statistics, e.g. REINFORCE++'s, thus see the whole batch);
optionally drop zero-variance groups (dynamic sampling); then one or more policy updates with the chosen clipped
loss (plus a KL penalty to the reference when ``kl_coef`` > 0), reduced with the row and token counts of the
whole step. The maths lives in ``advantages.py`` and ``losses/``; this file only wires it up.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from posttrain.advantages import ESTIMATORS, varied_groups
from posttrain.data.encode import render_prompt
from posttrain.distributed import DistContext
from posttrain.losses.kl import KL_ESTIMATORS
from posttrain.losses.policy import POLICY_LOSSES
from posttrain.losses.reduce import masked_sum
from posttrain.models.virtual import adapters_disabled
from posttrain.rewards import score_completions
from posttrain.rewards.shaping import overlong_penalty
from posttrain.rollout import SamplingParams
from posttrain.rollout.scoring import completion_logps
from posttrain.train.rl import (
    RLStage,
    ordered,
    prompt_seeds,
    reward_disagreement,
    sample_diversity,
    sampled_accuracy,
)
from posttrain.train.scaffold import Run, run_stage


class GRPOStage(RLStage):
    """Group-relative policy optimisation; see module docstring."""

    name = "grpo"

    def build(self, ctx: DistContext) -> tuple[Any, Any]:
        cfg = self.cfg
        model, tokenizer = self.build_policy(ctx)
        self.policy = POLICY_LOSSES[cfg.loss]
        name = ("dr_grpo" if cfg.loss == "dr_grpo" else "grpo") if cfg.advantage == "auto" else cfg.advantage
        self.estimator = ESTIMATORS[name]
        self.eps = {"eps_low": cfg.epsilon_low or None, "eps_high": cfg.epsilon_high or None}
        self.params = SamplingParams(
            n=cfg.group_size,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.min_new_tokens,
        )
        self.reward_failures = 0
        return model, tokenizer

    def prepare(self, run: Run) -> None:
        self.engines.refresh(run)  # a resumed run's weights

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "reward_failures": self.reward_failures}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.reward_failures = state.get("reward_failures", 0)

    def step(self, run: Run, indices: list[int], step: int) -> dict[str, Any]:
        cfg, ctx, g = self.cfg, run.ctx, self.cfg.group_size
        times: dict[str, float] = {}
        t = time.perf_counter()
        mine = ctx.shard(list(range(len(indices))))  # places in the global batch
        batch_rows = [self.rows[indices[p]] for p in mine]
        prompts = [render_prompt(r, run.tokenizer) for r in batch_rows]
        rollouts = self.engines.rollout.generate(prompts, self.params, seed=prompt_seeds(cfg, step, mine))
        times["generate_s"] = time.perf_counter() - t

        t = time.perf_counter()
        per_completion = [batch_rows[i] for i in rollouts.prompt_index]
        scores = score_completions(
            self.specs, rollouts.texts, per_completion, timeout_s=cfg.reward_timeout_s, on_error=cfg.reward_on_error
        )
        rewards = scores.total + overlong_penalty(
            rollouts.lengths, max_tokens=cfg.max_new_tokens, buffer=cfg.overlong_buffer
        )
        # Advantages from the whole batch's reward grid (N, G), then this rank's groups.
        grid = ordered(ctx, rewards.view(len(mine), g).float())
        advantages = self.estimator(grid)[mine].reshape(-1)
        varied = varied_groups(grid)
        keep = varied[mine].repeat_interleave(g) if cfg.dynamic_sampling else torch.ones_like(rewards, dtype=torch.bool)
        times["reward_s"] = time.perf_counter() - t

        record = self.update(run, rollouts, advantages, keep, times)
        self.engines.refresh(run)
        (failed,) = ctx.sum(scores.failed)
        self.reward_failures += int(failed)
        per_function = {}
        for name, values in scores.per_function.items():
            total, n = ctx.sum(float(values.float().sum()), values.numel())
            per_function[f"reward_{name}"] = total / n
        per_function.update(reward_disagreement(scores, ctx))
        strict, lenient = sampled_accuracy(rollouts.texts, per_completion, ctx)
        length_sum, count = ctx.sum(float(rollouts.lengths.sum()), len(rollouts.texts))
        record.update(
            reward_mean=float(grid.mean()),
            reward_std=float(grid.std()),
            **per_function,
            accuracy_strict=strict,
            accuracy_lenient=lenient,
            completion_length=length_sum / count,
            zero_std_fraction=float(1 - varied.float().mean()),
            **sample_diversity(rollouts, g, ctx),
            reward_failures=self.reward_failures,
            **{k: round(v, 4) for k, v in times.items()},
        )
        return record

    def update(self, run: Run, rollouts: Any, advantages: torch.Tensor, keep: torch.Tensor, times: dict) -> dict:
        """Reference and old log-probs, then ``updates_per_batch`` clipped policy updates over the kept completions,
        every loss reduced with the kept rows and tokens of the whole step (all ranks)."""
        cfg, ctx = self.cfg, run.ctx
        rows = keep.nonzero().squeeze(-1).tolist()
        kept_rows, kept_tokens = ctx.sum(len(rows), float(rollouts.mask[rows].sum()) if rows else 0.0)
        record: dict[str, Any] = {"finite": True, "kept_completions": int(kept_rows)}
        if kept_rows == 0:  # every group had equal rewards: nothing to learn from this batch
            record.update(loss=0.0, kl=0.0, clip_fraction=0.0, entropy=None, logp_diff_max=None)
            record.update(update_s=0.0, reference_s=0.0, grad_norm=0.0)
            return record
        # Every rank runs the same forwards (DDP and FSDP2 synchronise in them); a rank short of rows runs a
        # stand-in chunk of one row whose loss counts zero.
        chunks = [rows[i :: cfg.grad_accum] for i in range(cfg.grad_accum)]
        chunks = [(c, 1.0) if c else ([0], 0.0) for c in chunks]
        counts = {"max_tokens": cfg.max_new_tokens, "num_rows": kept_rows, "num_tokens": kept_tokens}

        t = time.perf_counter()
        ref, old = {}, {}
        for k, (chunk, _) in enumerate(chunks):
            with torch.no_grad(), run.amp():
                if cfg.kl_coef > 0:
                    if self.reference is not None:
                        ref[k] = completion_logps(self.reference, rollouts, temperature=cfg.temperature, rows=chunk)
                    else:
                        with adapters_disabled(run.model.module):
                            ref[k] = run.model.forward(
                                lambda m, c=chunk: completion_logps(m, rollouts, temperature=cfg.temperature, rows=c)
                            )
                if cfg.updates_per_batch > 1:
                    old[k] = run.model.forward(
                        lambda m, c=chunk: completion_logps(m, rollouts, temperature=cfg.temperature, rows=c)
                    )
        times["reference_s"] = time.perf_counter() - t

        t = time.perf_counter()
        gap = torch.zeros(())
        for _update in range(cfg.updates_per_batch):
            sums = {"loss": 0.0, "kl": 0.0, "clip": 0.0, "entropy": 0.0, "tokens": 0.0}
            for k, (chunk, weight) in enumerate(chunks):
                mask, adv = rollouts.mask[chunk], advantages[chunk]
                if not weight:  # a stand-in: nothing of it counts (an all-False mask drops even a NaN)
                    mask = torch.zeros_like(mask)
                with run.no_sync(last=k == len(chunks) - 1):
                    with run.amp():
                        logps, entropy = run.model.forward(
                            lambda m, c=chunk: completion_logps(
                                m, rollouts, temperature=cfg.temperature, rows=c, with_entropy=True
                            )
                        )
                    logps, entropy = logps.float(), entropy.float()
                    if _update == 0 and weight:
                        # One engine samples and trains: any real gap between its log-probs and ours is a bug signal.
                        diff = (logps.detach() - rollouts.logps[chunk].to(logps.device)).abs()[mask]
                        gap = torch.maximum(gap, diff.max().cpu()) if diff.numel() else gap
                    old_logps = logps.detach() if cfg.updates_per_batch == 1 else old[k].float()
                    loss, stats = self.policy(logps, old_logps, adv, mask, **counts, **self.eps)
                    if cfg.kl_coef > 0:
                        kl = KL_ESTIMATORS[cfg.kl_estimator](logps, ref[k].float())
                        loss = loss + cfg.kl_coef * self.policy.reduce(kl, mask, **counts)
                        sums["kl"] += float(masked_sum(kl.detach(), mask))
                    run.backward(loss)
                n_tok = float(mask.sum())
                sums["loss"] += float(loss.detach())
                sums["clip"] += float(stats["clip_fraction"]) * n_tok
                sums["entropy"] += float(masked_sum(entropy, mask))
                sums["tokens"] += n_tok
            finite, grad_norm, loss_value = run.update(sums["loss"])
            kl_sum, clip_sum, entropy_sum, tokens = ctx.sum(sums["kl"], sums["clip"], sums["entropy"], sums["tokens"])
            record["finite"] = record["finite"] and finite
            record.update(
                loss=loss_value,
                kl=kl_sum / tokens,
                clip_fraction=clip_sum / tokens,
                entropy=entropy_sum / tokens,
                grad_norm=grad_norm,
            )
        record["logp_diff_max"] = float(ctx.all_reduce(gap.reshape(1).clone(), op="max"))
        times["update_s"] = time.perf_counter() - t
        return record

    def summary(self, run: Run) -> dict[str, Any]:
        return {
            "loss": self.cfg.loss,
            "prompts": len(self.rows),
            "dropped_long_prompts": self.dropped,
            "reward_failures": self.reward_failures,
            "final_reward_mean": run.last_logged("reward_mean"),
            "eval_accuracy_strict": run.last_logged("eval_accuracy_strict"),
            **self.monitor_summary(),
        }


def run_grpo(cfg: Any, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run GRPO (or a variant) and write the run directory; returns the summary. ``stop_after`` returns right
    after that step, as if the process had died there (for resume tests)."""
    return run_stage(GRPOStage(cfg), stop_after=stop_after)
