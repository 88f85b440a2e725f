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

from typing import Any

import torch
from safetensors.torch import save_file

from posttrain.data.encode import render_prompt
from posttrain.distributed import DistContext
from posttrain.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_value_loss,
    gae,
    kl_exceeds,
    shaped_rewards,
    token_surrogate,
    whiten,
    whiten_sums,
)
from posttrain.losses.reduce import masked_sum
from posttrain.models.loading import save_model_dir
from posttrain.models.virtual import adapters_disabled
from posttrain.rewards import score_completions
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
    logps = logps.float()
    values = torch.zeros_like(logps).masked_scatter(rollouts.mask[rows], flat)
    return logps, values


class PPOStage(RLStage):
    """PPO with a value head; see module docstring."""

    name = "ppo"

    def build(self, ctx: DistContext) -> tuple[Any, Any]:
        cfg = self.cfg
        policy, tokenizer = self.build_policy(ctx)
        self.controller: Any = (
            AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
            if cfg.kl_controller == "adaptive"
            else FixedKLController(cfg.kl_coef)
        )
        self.params = SamplingParams(
            n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens
        )
        return PolicyWithValue(policy, _hidden_size(policy)), tokenizer

    def prepare(self, run: Run) -> None:
        self.engines.refresh(run, prefix="policy.")

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "kl_controller": self.controller.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.controller.load_state_dict(state["kl_controller"])

    def step(self, run: Run, indices: list[int], step: int) -> dict[str, Any]:
        cfg, ctx = self.cfg, run.ctx
        mine = ctx.shard(list(range(len(indices))))
        batch_rows = [self.rows[indices[p]] for p in mine]
        prompts = [render_prompt(r, run.tokenizer) for r in batch_rows]
        rollouts = self.engines.rollout.generate(prompts, self.params, seed=prompt_seeds(cfg, step, mine))
        per_completion = [batch_rows[i] for i in rollouts.prompt_index]
        scored = score_completions(
            self.specs, rollouts.texts, per_completion, timeout_s=cfg.reward_timeout_s, on_error=cfg.reward_on_error
        )
        scores = scored.total.float()
        b, mask = len(rollouts.texts), rollouts.mask
        everyone = list(range(b))
        pv = run.model.module
        with torch.no_grad(), run.amp():
            old_logps, old_values = run.model.forward(logps_and_values, rollouts, everyone, cfg.temperature)
            kl_tokens = torch.zeros_like(old_logps)
            if cfg.kl_coef > 0:
                if self.reference is not None:
                    ref_logps = completion_logps(self.reference, rollouts, temperature=cfg.temperature)
                else:
                    with adapters_disabled(pv.policy):
                        ref_logps = run.model.forward(
                            lambda m: completion_logps(m.policy, rollouts, temperature=cfg.temperature)
                        )
                kl_tokens = (old_logps - ref_logps) * mask
            rewards = shaped_rewards(scores, kl_tokens, mask, kl_coef=self.controller.value)
            advantages, returns = gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
            if cfg.whiten_advantages:  # over the whole batch's tokens, all ranks
                stats = ctx.all_reduce(whiten_sums(advantages.double(), mask)) if ctx.distributed else None
                advantages = whiten(advantages, mask, stats=stats)
        totals, updates, stopped, finite = self.epochs(run, rollouts, old_logps, old_values, advantages, returns, step)
        kl_sum, score_sum, reward_sum, value_sum, tokens, length_sum, count = ctx.sum(
            float(kl_tokens.sum()),
            float(scores.sum()),
            float(rewards.sum()),
            float((old_values * mask).sum()),
            float(mask.sum()),
            float(mask.sum()),
            b,
        )
        rollout_kl = kl_sum / count
        coef_used = self.controller.value
        self.controller.update(rollout_kl, n_steps=int(count))
        self.engines.refresh(run, prefix="policy.")
        strict, _ = sampled_accuracy(rollouts.texts, per_completion, ctx)
        return {
            "finite": finite,
            "loss": totals["pg_loss"] / max(updates, 1) + cfg.vf_coef * totals["vf_loss"] / max(updates, 1),
            "score_mean": score_sum / count,
            "reward_mean": reward_sum / count,
            "kl": rollout_kl,
            "kl_coef": coef_used,
            "updates": updates,
            "trust_region_stop": stopped,
            "accuracy_strict": strict,
            "completion_length": length_sum / count,
            **sample_diversity(rollouts, cfg.samples_per_prompt, ctx),
            **reward_disagreement(scored, ctx),
            "value_mean": value_sum / tokens,
            **{k: v / max(updates, 1) for k, v in totals.items()},
        }

    def epochs(
        self, run: Run, rollouts: Any, old_logps: Any, old_values: Any, advantages: Any, returns: Any, step: int
    ) -> tuple[dict[str, float], int, bool, bool]:
        """``ppo_epochs`` passes over shuffled minibatches of the *global* batch (the same minibatches whatever the
        number of ranks); each rank trains on its rows of each minibatch, normalised by the minibatch's tokens."""
        cfg, ctx, s = self.cfg, run.ctx, self.cfg.samples_per_prompt
        mask = rollouts.mask
        n_local = mask.shape[0] // s
        lengths = ordered(ctx, mask.sum(-1).float().view(n_local, s)).reshape(-1)  # global order
        total = lengths.numel()
        owner = {}  # global row -> local row on this rank
        for i, p in enumerate(ctx.shard(list(range(total // s)))):
            for j in range(s):
                owner[p * s + j] = i * s + j
        generator = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
        size = total // cfg.minibatches
        totals = {"pg_loss": 0.0, "vf_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
        updates, stopped, finite = 0, False, True
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(total, generator=generator).tolist()
            for start in range(0, total, size):
                batch = order[start : start + size]
                n_tok = float(lengths[batch].sum().clamp(min=1))
                mb = [owner[r] for r in batch if r in owner]
                weight = 1.0 if mb else 0.0
                mb = mb or [0]  # a stand-in row: every rank runs the same forwards; nothing of it counts
                m = mask[mb] if weight else torch.zeros_like(mask[mb])
                with run.amp():
                    logps, values = run.model.forward(logps_and_values, rollouts, mb, cfg.temperature)
                (kl_part,) = ctx.sum(float(masked_sum(old_logps[mb] - logps.detach(), m)))
                approx_kl = kl_part / n_tok
                if updates and kl_exceeds(approx_kl, cfg.trust_region_kl):
                    stopped = True  # the policy left the trust region: no more updates on this batch
                    break
                ratio = torch.exp(logps.detach() - old_logps[mb])
                pg = masked_sum(token_surrogate(logps, old_logps[mb], advantages[mb], m, clip=cfg.clip_eps), m)
                vf = masked_sum(clipped_value_loss(values, old_values[mb], returns[mb], m, clip=cfg.value_clip), m)
                loss = (pg + cfg.vf_coef * vf) / n_tok
                run.backward(loss)
                clipped = float((((ratio - 1).abs() > cfg.clip_eps) & m).sum())
                pg_sum, vf_sum, clip_sum = ctx.sum(float(pg.detach()), float(vf.detach()), clipped)
                ok, _, _ = run.update(float(loss.detach()))
                finite = finite and ok
                updates += 1
                totals["pg_loss"] += pg_sum / n_tok
                totals["vf_loss"] += vf_sum / n_tok
                totals["approx_kl"] += approx_kl
                totals["clip_fraction"] += clip_sum / n_tok
            if stopped:
                break
        return totals, updates, stopped, finite

    def save_final(self, run: Run, path: Any) -> None:
        full = run.final_state()
        pv = run.model.module
        policy_state = {k[7:]: v for k, v in full.items() if k.startswith("policy.")} if full else None
        save_model_dir(pv.policy, run.tokenizer, path, state_dict=policy_state)
        head = {k[11:]: v for k, v in full.items() if k.startswith("value_head.")} if full else None
        head = head or {k: v.detach().cpu() for k, v in pv.value_head.state_dict().items()}
        save_file({k: v.contiguous() for k, v in head.items()}, str(path.parent / "value_head.safetensors"))

    def summary(self, run: Run) -> dict[str, Any]:
        return {
            "prompts": len(self.rows),
            "dropped_long_prompts": self.dropped,
            "final_score_mean": run.last_logged("score_mean"),
            **self.monitor_summary(),
            "kl_coef": self.controller.value,
        }


def run_ppo(cfg: Any, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run PPO and write the run directory; returns the summary."""
    return run_stage(PPOStage(cfg), stop_after=stop_after)
