"""``posttrain rm``: a Bradley–Terry reward model, and reward-model scoring (one model or an ensemble).

The model is ``AutoModelForSequenceClassification`` (one label) over the causal LM's backbone: the reward of a
(prompt, reply) is the score head applied to the hidden state of the sequence's last token (the reply's EOS),
exactly where ``transformers`` pools, so the saved ``final/`` loads with plain ``transformers``:

    AutoModelForSequenceClassification.from_pretrained("runs/rm/final")

Loss per pair: -log sigma(r(chosen) - r(rejected) - margin), ``margin`` from the row's optional ``margin``
column (0 otherwise). Pairs are packed padding-free, chosen and rejected in one forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from posttrain.data.encode import EncodeStats, Example, apply_length_policy, encode_row
from posttrain.data.prepare import checked_rows
from posttrain.distributed import DistContext
from posttrain.errors import ConfigError, DataError
from posttrain.losses.preference import bradley_terry_loss
from posttrain.losses.reduce import row_mean
from posttrain.models.templates import use_chat_template
from posttrain.rewards.model import load_reward_model, sequence_rewards
from posttrain.train.policy import default_eval_data
from posttrain.train.scaffold import Run, Stage, even_chunks, forward_rows, run_stage


def encode_pairs(
    source: Any, tokenizer: Any, cfg: Any, *, run_dir: Any = None, label: str = "data"
) -> tuple[list[tuple[Example, Example]], list[float], dict]:
    name = source if isinstance(source, str) else "<rows>"
    checked = checked_rows(source, "preference", skip_bad_rows=cfg.skip_bad_rows, run_dir=run_dir, label=label)
    stats = EncodeStats()
    pairs, margins = [], []
    for row, line in zip(checked.rows, checked.lines):
        margin = row.get("margin")
        margin = 0.0 if margin is None else margin  # a null margin (Parquet, CSV) is no margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise DataError(name, line, "margin", f"expected a finite number, got {margin!r}")
        encoded = []
        for key in ("chosen", "rejected"):
            pair_row = {"prompt": row["prompt"], "completion": row[key]}
            try:
                example = encode_row(pair_row, tokenizer, completion_only=False, max_length=cfg.max_length)
            except DataError as err:
                raise DataError(name, line, err.field, err.reason) from None
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


class RMStage(Stage):
    """Bradley-Terry training of a scalar head over the backbone."""

    name = "rm"

    def build(self, ctx: DistContext) -> tuple[Any, Any]:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model, tokenizer = load_reward_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        tokenizer = use_chat_template(tokenizer, cfg.chat_template, key="rm.chat_template")
        run_dir = cfg.out if ctx.is_main else None  # rank 0 writes bad_rows.json
        self.pairs, self.margins, self.counts = encode_pairs(cfg.data, tokenizer, cfg, run_dir=run_dir)
        source = cfg.eval_data or default_eval_data(cfg.data)
        self.eval_pairs = encode_pairs(source, tokenizer, cfg, run_dir=run_dir, label="eval")[0] if source else []
        if cfg.batch_size % (ctx.world * cfg.grad_accum):
            raise ConfigError(
                f"rm.batch_size: {cfg.batch_size} pairs cannot be split into {ctx.world} ranks x"
                f" grad_accum={cfg.grad_accum} equal micro-batches"
            )
        return model, tokenizer

    def rows_per_step(self) -> tuple[int, int]:
        return len(self.pairs), self.cfg.batch_size

    def training_data(self) -> Any:
        return self.pairs, self.margins

    def step(self, run: Run, indices: list[int], step: int) -> dict[str, Any]:
        mine = run.ctx.shard(indices)
        loss_sum, right, margin_sum = 0.0, 0.0, 0.0
        for part in run.micro_batches(mine, self.cfg.grad_accum):
            with run.amp():
                chosen, rejected = run.model.forward(pair_rewards, [self.pairs[i] for i in part])
            margin = torch.tensor([self.margins[i] for i in part], device=chosen.device)
            loss = row_mean(bradley_terry_loss(chosen.float(), rejected.float(), margin), num_rows=len(indices))
            run.backward(loss)
            loss_sum += float(loss.detach())
            right += float((chosen > rejected).sum())
            margin_sum += float((chosen - rejected).detach().sum())
        finite, grad_norm, loss_value = run.update(loss_sum)
        right, margin_sum = run.ctx.sum(right, margin_sum)
        n = len(indices)
        return {
            "finite": finite,
            "loss": loss_value,
            "grad_norm": grad_norm,
            "accuracy": right / n,
            "margin": margin_sum / n,
        }

    def evaluate(self, run: Run) -> dict[str, float]:
        """Share of held-out pairs whose chosen reply gets the higher reward."""
        if not self.eval_pairs:
            return {}
        right, counted = 0, 0
        with run.evaluating():
            for chunk, real in even_chunks(run.ctx, self.eval_pairs, forward_rows(self.cfg)):
                with run.amp():
                    chosen, rejected = run.model.forward(pair_rewards, chunk)
                if real:
                    right += int((chosen > rejected).sum())
                    counted += len(chunk)
        right, counted = run.ctx.sum(right, counted)
        return {"eval_pair_accuracy": right / counted}

    def summary(self, run: Run) -> dict[str, Any]:
        return dict(self.counts)


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
    return run_stage(RMStage(cfg), stop_after=stop_after)
