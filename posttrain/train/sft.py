"""The ``pretrain`` and ``sft`` stages: the causal-LM loss on packed, padding-free batches (on completion tokens
for SFT, on every token for pretraining), with replay mixing against forgetting.

One step: the global batch of ``batch_size`` examples; this rank packs its share into ``grad_accum``
micro-batches; each micro-batch's summed token loss is divided by the target-token count of the *whole* global
batch, so micro-batches and ranks add up to the gradient of the full batch.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from posttrain.config import build_config, SFTConfig
    >>> out = tempfile.mkdtemp()
    >>> cfg = build_config(SFTConfig, {"out": out, "max_steps": 2, "batch_size": 2, "progress": False,
    ...                                "lr": 1e-3}, path="sft")
    >>> summary = run_sft(cfg)
    >>> summary["steps"], sorted(p.name for p in Path(out).iterdir() if not p.name.startswith("."))
    (2, ['checkpoints', 'config.yaml', 'final', 'metrics.jsonl', 'summary.json'])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from posttrain.data.batching import PackedBatch, pack
from posttrain.data.encode import Example
from posttrain.data.prepare import PreparedData, mix_replay, prepare_examples
from posttrain.distributed import DistContext
from posttrain.errors import ConfigError
from posttrain.eval.loss import packed_token_losses
from posttrain.losses import masked_sum
from posttrain.train.policy import default_eval_data, model_for_training
from posttrain.train.scaffold import Run, Stage, even_chunks, forward_rows, run_stage

LossFn = Callable[[Any, PackedBatch], tuple[torch.Tensor, torch.Tensor]]


class LMStage(Stage):
    """Causal-LM training. ``model``/``examples`` may be given directly (Python API, tests, benchmarks)."""

    def __init__(
        self,
        cfg: Any,
        *,
        name: str = "sft",
        model: Any = None,
        tokenizer: Any = None,
        examples: Sequence[Example] | None = None,
        eval_examples: Sequence[Example] | None = None,
        loss_fn: LossFn = packed_token_losses,
    ):
        super().__init__(cfg)
        self.name, self.loss_fn = name, loss_fn
        self.model, self.tokenizer = model, tokenizer
        self.examples, self.eval_examples = examples, eval_examples
        self.data: PreparedData | None = None
        self.replayed = 0

    def training_data(self) -> Any:
        return self.examples

    def build(self, ctx: DistContext) -> tuple[Any, Any]:
        cfg = self.cfg
        if self.model is None:
            self.model, self.tokenizer = model_for_training(cfg, ctx.device)
        if self.examples is None:
            common = dict(
                max_length=cfg.max_length,
                length_policy=cfg.length_policy,
                completion_only=cfg.completion_only_loss,
                skip_bad_rows=cfg.skip_bad_rows,
                run_dir=cfg.out if ctx.is_main else None,
            )
            kind = "text" if self.name == "pretrain" else "sft"
            self.data = prepare_examples(cfg.data, self.tokenizer, kind=kind, **common)
            self.examples = self.data.examples
            if cfg.replay_data and cfg.replay_fraction:
                replay = prepare_examples(cfg.replay_data, self.tokenizer, kind="sft", label="replay", **common)
                self.examples = mix_replay(self.examples, replay.examples, cfg.replay_fraction, seed=cfg.seed)
                self.replayed = len(self.examples) - len(self.data.examples)
            source = cfg.eval_data or default_eval_data(cfg.data)
            if source:
                self.eval_examples = prepare_examples(
                    source, self.tokenizer, kind=kind, label="eval", **common
                ).examples
        if cfg.batch_size % (ctx.world * cfg.grad_accum):
            raise ConfigError(
                f"{self.name}.batch_size: {cfg.batch_size} rows cannot be split into {ctx.world} ranks x"
                f" grad_accum={cfg.grad_accum} equal micro-batches"
            )
        return self.model, self.tokenizer

    def rows_per_step(self) -> tuple[int, int]:
        return len(self.examples), self.cfg.batch_size

    def step(self, run: Run, indices: list[int], step: int) -> dict[str, Any]:
        batch = [self.examples[i] for i in indices]
        # Whole-step counts, known on every rank without communication: every rank sees the global batch.
        n_targets = max(sum(sum(e.loss_mask[1:]) for e in batch), 1)
        tokens = sum(len(e.input_ids) for e in batch)

        def forward(k: int, packed: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
            losses, right = run.model.forward(self.loss_fn, packed)
            return masked_sum(losses.float(), packed.target_mask), right

        finite, grad_norm, loss, accuracy = self.accumulate(run, run.ctx.shard(batch), n_targets, forward)
        return {"finite": finite, "loss": loss, "grad_norm": grad_norm, "token_accuracy": accuracy, "tokens": tokens}

    def accumulate(
        self,
        run: Run,
        rows: list[Example],
        n_targets: int,
        forward: Callable[[int, PackedBatch], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[bool, float, float, float]:
        """This rank's ``rows`` in ``grad_accum`` packed micro-batches: ``forward(k, packed) -> (summed token loss,
        correct (n,))`` under autocast, each sum divided by the whole step's ``n_targets`` and backpropagated, then
        the update. Returns (finite, gradient norm, the step's loss, its token accuracy), global values."""
        loss_sum, correct = 0.0, 0
        for k, part in enumerate(run.micro_batches(rows, self.cfg.grad_accum)):
            packed = pack(part).to(run.ctx.device)
            with run.amp():
                summed, right = forward(k, packed)
            loss = summed / n_targets
            run.backward(loss)
            loss_sum += float(loss.detach())
            correct += int(right.sum())
        finite, grad_norm, loss_value = run.update(loss_sum)
        (correct_all,) = run.ctx.sum(correct)
        return finite, grad_norm, loss_value, correct_all / n_targets

    def evaluate(self, run: Run) -> dict[str, float]:
        """Token-mean NLL on the held-out examples (each rank a share; summed over ranks)."""
        if not self.eval_examples:
            return {}
        total, count, correct = 0.0, 0, 0
        with run.evaluating():
            for chunk, counts in even_chunks(run.ctx, list(self.eval_examples), forward_rows(self.cfg)):
                packed = pack(chunk).to(run.ctx.device)
                with run.amp():
                    losses, right = run.model.forward(packed_token_losses, packed)
                if counts:
                    total += float(losses.float().sum())
                    count += packed.num_target_tokens
                    correct += int(right.sum())
        total, count, correct = run.ctx.sum(total, count, correct)
        nll = total / max(count, 1)
        return {
            "eval_loss": nll,
            "eval_perplexity": math.exp(min(nll, 50.0)),
            "eval_token_accuracy": correct / max(count, 1),
            "eval_tokens": int(count),
        }

    def summary(self, run: Run) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "data": self.data.summary() if self.data else {"examples": len(self.examples)},
            "replay": {"source": cfg.replay_data, "examples": self.replayed} if self.replayed else None,
        }


def run_sft(cfg: Any, *, stop_after: int | None = None) -> dict[str, Any]:
    """Supervised fine-tuning (full or LoRA); see module docstring."""
    return run_stage(LMStage(cfg, name="sft"), stop_after=stop_after)


def run_pretrain(cfg: Any, *, stop_after: int | None = None) -> dict[str, Any]:
    """Causal-LM pretraining (from scratch with ``model: builtin:tiny``) or continued pretraining."""
    return run_stage(LMStage(cfg, name="pretrain"), stop_after=stop_after)


@dataclass
class LoopResult:
    """What :func:`train` reports."""

    steps: int
    skipped_steps: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    final_loss: float | None
    eval: dict[str, float]
    resumed_from: int | None = None


def train(
    model: Any,
    examples: Sequence[Example],
    cfg: Any,
    run_dir: Path,
    *,
    tokenizer: Any = None,
    eval_examples: Sequence[Example] = (),
    loss_fn: LossFn = packed_token_losses,
    stage: str = "train",
    stop_after: int | None = None,
) -> LoopResult:
    """Train ``model`` in place on already tokenised ``examples`` (the scaffold with a given model and data; the
    run directory is written as for any stage). ``loss_fn(model, packed_batch) -> (token losses, correct)``."""
    cfg = replace(cfg, out=str(run_dir))
    lm = LMStage(
        cfg,
        name=stage,
        model=model,
        tokenizer=tokenizer,
        examples=examples,
        eval_examples=eval_examples,
        loss_fn=loss_fn,
    )
    summary = run_stage(lm, stop_after=stop_after)
    if summary.get("stopped_early"):
        return LoopResult(summary["steps"], 0, 0.0, 0, 0.0, None, {})
    return LoopResult(
        steps=summary["steps"],
        skipped_steps=summary["skipped_steps"],
        wall_s=summary["train_wall_s"],
        tokens=summary["tokens"],
        tokens_per_s=summary["tokens_per_s"],
        final_loss=summary["final_train_loss"],
        eval=summary["heldout"],
        resumed_from=summary["resumed_from"],
    )
