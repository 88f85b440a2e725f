"""What the RL stages (GRPO, PPO) share: prompt rows, held-out rows, the KL reference, the rollout engines, the
per-prompt sampling seeds and the metrics of a batch of samples, all of them rank-aware.

Sampling is seeded per prompt by (seed, step, the prompt's place in the global batch), so the samples do not
depend on how the batch is split over ranks: N ranks draw what one process draws.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from posttrain.config import adapter_method
from posttrain.data.encode import render_prompt
from posttrain.data.rows import load_rows, validate_rows
from posttrain.errors import ConfigError, DataError
from posttrain.eval.harness import heldout_accuracy
from posttrain.models.virtual import continues_adapter
from posttrain.rewards import check_reward_columns, parse_rewards
from posttrain.rewards.verify import score_answer
from posttrain.rollout.factory import make_engine
from posttrain.safeguards.monitor import HackingMonitor, Thresholds, distinct_n, pairwise_overlap
from posttrain.train.policy import model_for_training
from posttrain.train.scaffold import Stage


def prompt_rows(cfg: Any, tokenizer: Any, stage: str, specs: list | None = None) -> tuple[list[dict], int]:
    """The prompt rows that fit ``max_length`` (others dropped and counted); gold-only columns removed. With
    ``specs``, a reward that needs a column the rows lack (``correct`` without ``answer``) is an error here."""
    checked = validate_rows(load_rows(cfg.data), "prompt", source=cfg.data, skip_bad_rows=False)
    if specs:
        check_reward_columns(specs, checked.rows, cfg.data, lines=checked.lines)
    rows = checked.rows
    kept = [
        r
        for r in rows
        if len(tokenizer(render_prompt(r, tokenizer, max_length=cfg.max_length), add_special_tokens=False)["input_ids"])
        <= cfg.max_length
    ]
    if not kept:
        raise ConfigError(f"{stage}.max_length: all {len(rows)} prompts are longer than {cfg.max_length} tokens")
    return [{k: v for k, v in r.items() if k not in ("completion", "question")} for r in kept], len(rows) - len(kept)


def heldout_rows(cfg: Any, stage: str) -> list[dict]:
    """Held-out rows {prompt, answer} for the greedy accuracy: ``eval_data``, else the task's val split when
    training on a built-in task, else none."""
    source = cfg.eval_data
    if not source:
        if not cfg.data.startswith("task:"):
            if cfg.eval_every:
                raise ConfigError(f"{stage}.eval_data: eval_every needs held-out rows with answers (give eval_data)")
            return []
        source = "task:" + cfg.data.split(":")[1] + ":val"
    rows = validate_rows(load_rows(source), "prompt", source=source, skip_bad_rows=False).rows
    for i, row in enumerate(rows):
        if "answer" not in row:
            raise DataError(source, i + 1, "answer", "held-out rows for the greedy accuracy need an answer")
    return rows[: cfg.eval_limit]


def make_reference(model: Any, cfg: Any) -> Any:
    """The KL reference: none without KL; with adapters none either (the base with adapters disabled serves, so no
    second copy is held); else (and for a continued prompt/prefix adapter, whose start is the adapter as loaded)
    a frozen copy of the starting model (taken before any sharding)."""
    if cfg.kl_coef == 0 or (adapter_method(cfg) and not continues_adapter(model)):
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


def prompt_seeds(cfg: Any, step: int, positions: list[int]) -> list[int]:
    """One sampling seed per prompt: a function of (seed, step, place in the global batch) only."""
    return [(cfg.seed * 1_000_003 + step) * 1_009 + p for p in positions]


class Engines:
    """The rollout engine, and the one measuring the held-out accuracy (the same unless rollouts are sampled in
    another precision: the accuracy is measured in the weights' own).

    Made in the stage's ``build``, before the model is wrapped: under FSDP2 the trained module will hold shards
    only, so the engine samples from a whole copy taken now and refreshed from gathered weights."""

    def __init__(self, cfg: Any, policy: Any, tokenizer: Any, ctx: Any):
        self.sharded = cfg.fsdp and ctx.distributed
        if self.sharded and cfg.rollout_engine == "vllm" and adapter_method(cfg):
            raise ConfigError(
                "rollout_engine: vllm with fsdp and LoRA is not supported (the gathered adapter weights would need"
                " merging); use DDP (no --fsdp) or the hf engine"
            )
        self.rollout = make_engine(cfg.rollout_engine, policy, tokenizer, dtype=cfg.rollout_dtype, copy=self.sharded)
        self.eval = self.rollout
        if cfg.rollout_engine == "hf" and cfg.rollout_dtype != "auto":
            # The held-out accuracy is measured in the weights' own precision, whatever the rollouts use.
            self.eval = make_engine("hf", policy, tokenizer, copy=self.sharded)
        self.policy = policy

    def refresh(self, run: Any, prefix: str = "") -> None:
        """The engine samples the current weights (after an update or a resume; gathered under FSDP2)."""
        if self.sharded:
            full = run.model.full_state(trainable_only=False)
            state = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
            for engine in {id(e): e for e in (self.rollout, self.eval)}.values():
                engine.update_weights(state)
        else:
            self.rollout.update_weights(self.policy)


def heldout(engines: Engines, rows: list[dict], ctx: Any, max_new_tokens: int) -> dict[str, float]:
    """Greedy strict/lenient/fair accuracy on ``rows``, each rank a share, summed over ranks."""
    if not rows:
        return {}
    mine = ctx.shard(rows)
    acc = heldout_accuracy(engines.eval, mine, max_new_tokens) if mine else {}
    keys = [f"eval_accuracy_{kind}" for kind in ("strict", "lenient", "fair")]
    totals = ctx.sum(*(acc.get(key, 0.0) * len(mine) for key in keys))
    return {key: total / len(rows) for key, total in zip(keys, totals)}


def sampled_accuracy(texts: list[str], rows: list[dict], ctx: Any) -> tuple[float | None, float | None]:
    """(strict, lenient) accuracy of the samples whose rows have an answer, over all ranks (None without any)."""
    scores = [score_answer(t, str(r["answer"])) for t, r in zip(texts, rows) if "answer" in r]
    strict, lenient, count = ctx.sum(sum(s for s, _ in scores), sum(le for _, le in scores), len(scores))
    return (strict / count, lenient / count) if count else (None, None)


def sample_diversity(rollouts: Any, group_size: int, ctx: Any) -> dict[str, float]:
    """Within-group diversity of a step's samples over all ranks (token ids, generated tokens only): distinct-1,
    distinct-2 and pairwise bigram overlap, each the mean over the groups that have the n-grams it needs
    (``safeguards.monitor``; sums and counts reduced across ranks separately)."""
    samples = [row[m].tolist() for row, m in zip(rollouts.completion_ids, rollouts.mask)]
    groups = [samples[i : i + group_size] for i in range(0, len(samples), group_size)]
    stats = {
        "distinct_1": [distinct_n(g, 1) for g in groups],
        "distinct_2": [distinct_n(g, 2) for g in groups],
        "overlap_2": [pairwise_overlap(g, 2) for g in groups],
    }
    parts = [
        x
        for values in stats.values()
        for x in (sum(v for v in values if v is not None), sum(v is not None for v in values))
    ]
    totals = ctx.sum(*parts)
    return {k: totals[2 * i] / totals[2 * i + 1] for i, k in enumerate(stats) if totals[2 * i + 1]}


def reward_disagreement(scores: Any, ctx: Any) -> dict[str, float]:
    """``reward_disagreement``: a reward-model ensemble's mean per-completion spread over all ranks ({} without an
    ensemble)."""
    if scores.disagreement is None:
        return {}
    total, n = ctx.sum(float(scores.disagreement.sum()), scores.disagreement.numel())
    return {"reward_disagreement": total / n}


def ordered(ctx: Any, local: torch.Tensor) -> torch.Tensor:
    """Every rank's (n, ...) part of a batch that was split with ``ctx.shard``, back in the batch's order."""
    if not ctx.distributed:
        return local
    gathered = ctx.all_gather(local)
    n = local.shape[0]
    order = [(p % ctx.world) * n + p // ctx.world for p in range(n * ctx.world)]
    return gathered[order]


class RLStage(Stage):
    """What GRPO and PPO set up alike: reward functions, the policy, prompt and held-out rows, the KL reference
    and the rollout engines (all before any wrapping); the held-out greedy accuracy as evaluation."""

    def build_policy(self, ctx: Any) -> tuple[Any, Any]:
        """(policy, tokenizer) with ``specs``, ``rows``, ``dropped``, ``eval_rows``, ``reference`` and ``engines``
        set on the stage."""
        cfg = self.cfg
        if cfg.batch_prompts % ctx.world:
            raise ConfigError(
                f"{self.name}.batch_prompts: {cfg.batch_prompts} prompts cannot be split over {ctx.world} ranks"
            )
        self.specs = parse_rewards(cfg.reward, cfg.reward_weights)
        policy, tokenizer = model_for_training(cfg, ctx.device)
        self.rows, self.dropped = prompt_rows(cfg, tokenizer, self.name, self.specs)
        self.eval_rows = heldout_rows(cfg, self.name)
        self.reference = make_reference(policy, cfg)
        self.engines = Engines(cfg, policy, tokenizer, ctx)
        self.monitor = HackingMonitor(
            Thresholds(
                window=cfg.monitor_window,
                gold_tolerance=cfg.gold_tolerance,
                kl_budget=cfg.kl_budget,
                length_drift=cfg.length_drift,
                min_distinct_2=cfg.min_distinct_2,
                max_overlap=cfg.max_overlap,
                min_entropy=cfg.min_entropy,
                max_disagreement=cfg.max_disagreement,
            )
        )
        return policy, tokenizer

    def watch(self, run: Any, step: int, record: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
        """The reward-hacking monitor on this step's record: proxy = the mean reward being optimised, gold = the
        held-out greedy strict accuracy (at evaluation steps; the optimiser never sees those rows), KL to the
        reference, completion length, within-group diversity of the samples, token entropy, and a reward-model
        ensemble's disagreement."""
        stats = {
            "proxy": record.get("score_mean", record.get("reward_mean")),  # PPO's score: before its KL penalty
            "gold": record.get("eval_accuracy_strict"),
            "kl": record.get("kl"),
            "length": record.get("completion_length"),
            "distinct_2": record.get("distinct_2"),
            "overlap_2": record.get("overlap_2"),
            "entropy": record.get("entropy"),
            "disagreement": record.get("reward_disagreement"),
        }
        alerts = self.monitor.observe(step, stats)
        return alerts, stats["gold"] is not None and self.monitor.best_step == step

    def extra_state(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.monitor.load_state(state.get("monitor", {}))

    def monitor_summary(self) -> dict[str, Any]:
        return {"best_step": self.monitor.best_step, "best_heldout_strict": self.monitor.best_gold}

    def rows_per_step(self) -> tuple[int, int]:
        return len(self.rows), self.cfg.batch_prompts

    def training_data(self) -> Any:
        return self.rows

    def evaluate(self, run: Any) -> dict[str, float]:
        return heldout(self.engines, self.eval_rows, run.ctx, self.cfg.max_new_tokens)
