"""``posttrain dpo``: preference optimisation (DPO, cDPO, IPO, SimPO, ORPO on pairs; KTO on unpaired rows).

One step: take B rows; pack every chosen and rejected (or labelled) sequence of the batch into one
padding-free row; one forward gives each sequence's summed completion log-prob; the loss of
``posttrain.losses.preference`` compares them with the reference's. The reference log-probs are computed once,
before the first step, by the starting model (with LoRA: the base with adapters disabled) for every row the
run's deterministic sampler will visit, and saved to the run directory, so no reference model is kept in
memory and a resumed run uses exactly the same numbers. Reference-free losses (SimPO, ORPO) skip that pass.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from posttrain.config import adapter_method
from posttrain.data.batching import ResumableSampler, pack
from posttrain.data.encode import EncodeStats, Example, apply_length_policy, encode_row
from posttrain.data.prepare import checked_rows
from posttrain.distributed import DistContext
from posttrain.errors import ConfigError, DataError
from posttrain.losses.preference import PAIRED_LOSSES, REFERENCE_FREE, kto_loss, kto_reference_point
from posttrain.losses.reduce import row_mean
from posttrain.models.forward import target_logps
from posttrain.models.virtual import adapters_disabled, continues_adapter
from posttrain.rundir import save_tensors_atomic
from posttrain.train.policy import default_eval_data, model_for_training
from posttrain.train.scaffold import Run, Stage, even_chunks, fingerprint, forward_rows, model_fingerprint, run_stage


def encode_pairs(
    source: Any, tokenizer: Any, cfg: Any, *, run_dir: Any = None, label: str = "data"
) -> tuple[list[tuple[Example, ...]], list[bool], dict]:
    """Rows -> per row (chosen, rejected) examples (kto: (completion,) and its label), completion-only masks."""
    kto = cfg.loss == "kto"
    name = source if isinstance(source, str) else "<rows>"
    checked = checked_rows(
        source, "unpaired" if kto else "preference", skip_bad_rows=cfg.skip_bad_rows, run_dir=run_dir, label=label
    )
    stats = EncodeStats()
    items, labels = [], []
    for row, line in zip(checked.rows, checked.lines):
        keys = ("completion",) if kto else ("chosen", "rejected")
        examples = []
        for key in keys:
            try:
                example = encode_row(
                    {"prompt": row["prompt"], "completion": row[key]}, tokenizer, max_length=cfg.max_length
                )
            except DataError as err:
                raise DataError(name, line, err.field, err.reason) from None
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
    logps, where, _ = target_logps(model, batch)  # the head runs on completion positions only
    n = len(examples)
    sums = torch.zeros(n, dtype=logps.dtype, device=device).index_add(0, batch.seq_ids[0, where], logps)
    lengths = torch.zeros(n, device=device).index_add(0, batch.seq_ids[0], batch.target_mask[0].float())
    return sums, lengths.clamp(min=1)


@torch.no_grad()
def reference_logps(
    model: Any, items: list[tuple[Example, ...]], cfg: Any, *, rows: list[int] | None = None
) -> torch.Tensor:
    """(rows, sequences per row) reference log-probs of the starting model (adapters disabled under LoRA) for
    ``rows`` (default all); rows not computed are NaN. Computed under the precision the policy trains in (bf16
    autocast with ``mixed_precision: bf16``), so that at step 1 policy and reference agree and the loss is ln 2."""
    was_training = model.training
    device = next(model.parameters()).device
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.mixed_precision == "bf16" else nullcontext()
    model.eval()
    rows = list(range(len(items))) if rows is None else rows
    out = torch.full((len(items), len(items[0])), math.nan)
    # The starting model: under an adapter, the base with it disabled (a continued prompt adapter is its own start:
    # this pass runs before any update).
    adapters_off = adapters_disabled(model) if adapter_method(cfg) and not continues_adapter(model) else nullcontext()
    with adapters_off, amp:
        size = forward_rows(cfg)
        shown = cfg.progress and os.environ.get("RANK", "0") == "0" and len(rows) > size
        for start in tqdm(range(0, len(rows), size), desc="reference log-probs", unit="batch", disable=not shown):
            chunk = rows[start : start + size]
            sums, _ = sequence_logps(model, [e for i in chunk for e in items[i]])
            out[chunk] = sums.view(len(chunk), -1).float().cpu()
    model.train(was_training)
    return out


def visited_rows(size: int, cfg: Any, ctx: DistContext | None = None) -> list[int]:
    """Every row index the run's sampler will hand out in ``max_steps`` steps (the sampler is deterministic),
    or with ``ctx`` only those that this rank's share of each step will contain."""
    sampler = ResumableSampler(size, seed=cfg.seed)
    take = (lambda b: ctx.shard(b)) if ctx is not None else (lambda b: b)
    return sorted({i for _ in range(cfg.max_steps) for i in take(sampler.take(cfg.batch_size))})


def shared_reference(model: Any, items: list, cfg: Any, ctx: DistContext, rows: list[int]) -> torch.Tensor:
    """Reference log-probs of ``rows``, each rank computing its part; the table is then complete on every rank
    (ranks fill what they computed, NaN elsewhere becomes -inf for a max-reduce, and back)."""
    table = reference_logps(model, items, cfg, rows=rows)
    if ctx.distributed:
        table = ctx.all_reduce(torch.nan_to_num(table, nan=-math.inf), op="max")
        table[torch.isneginf(table)] = math.nan
    return table


def preference_loss(
    model: Any,
    items: list[tuple[Example, ...]],
    labels: list[bool],
    ref: torch.Tensor | None,
    cfg: Any,
    reference_point: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row loss (B,) and stats for a batch of rows (see ``posttrain.losses.preference``); KTO uses
    ``reference_point`` as its z when given (the whole step's, for exact accumulation)."""
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
            reference_point=reference_point,
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


class DPOStage(Stage):
    """Preference optimisation on pairs (or KTO's labelled rows), reference log-probs computed up front."""

    name = "dpo"

    def build(self, ctx: DistContext) -> tuple[Any, Any]:
        cfg = self.cfg
        model, tokenizer = model_for_training(cfg, ctx.device)
        run_dir = cfg.out if ctx.is_main else None  # rank 0 writes bad_rows.json
        self.items, self.labels, self.counts = encode_pairs(cfg.data, tokenizer, cfg, run_dir=run_dir)
        source = cfg.eval_data or default_eval_data(cfg.data)
        self.eval_items, self.eval_labels = (
            encode_pairs(source, tokenizer, cfg, run_dir=run_dir, label="eval")[:2] if source else ([], [])
        )
        if cfg.batch_size % (ctx.world * cfg.grad_accum):
            raise ConfigError(
                f"dpo.batch_size: {cfg.batch_size} rows cannot be split into {ctx.world} ranks x"
                f" grad_accum={cfg.grad_accum} equal micro-batches"
            )
        self.ref = self.eval_ref = None
        if cfg.loss not in REFERENCE_FREE:
            self._reference(model, cfg, ctx)
        return model, tokenizer

    def _reference(self, model: Any, cfg: Any, ctx: DistContext) -> None:
        """Reference log-probs from the run directory's cache when it was computed from this starting model and
        this data (its key says so), else computed; the cache is written atomically (rank 0)."""
        path = Path(cfg.out) / "reference_logps.safetensors"
        key = fingerprint(
            [model_fingerprint(model), self.items, self.eval_items, adapter_method(cfg), cfg.mixed_precision]
        )
        saved = cached_reference(path, key)
        needed = visited_rows(len(self.items), cfg, ctx)
        if saved is not None and "train" in saved:
            self.ref, self.eval_ref = saved["train"], saved.get("eval")
            # A resumed run may go further (a larger max_steps): compute the rows it has not seen yet.
            missing = [i for i in needed if math.isnan(float(self.ref[i, 0]))]
            total_missing = ctx.sum(len(missing))[0]  # every rank takes the same branch (collectives inside)
            if not total_missing and (self.eval_ref is not None or not self.eval_items):
                return
            if total_missing:
                extra = shared_reference(model, self.items, cfg, ctx, missing)
                self.ref = torch.where(torch.isnan(self.ref), extra, self.ref)
        else:
            # Only the rows this run will visit (each rank its own share), before any sharding of the model.
            self.ref = shared_reference(model, self.items, cfg, ctx, needed)
        if self.eval_items and self.eval_ref is None:
            mine = ctx.shard(list(range(len(self.eval_items))))
            self.eval_ref = shared_reference(model, self.eval_items, cfg, ctx, mine)
        if ctx.is_main:
            tensors = {"train": self.ref, **({"eval": self.eval_ref} if self.eval_ref is not None else {})}
            save_tensors_atomic(tensors, path, {"key": key})

    def rows_per_step(self) -> tuple[int, int]:
        return len(self.items), self.cfg.batch_size

    def training_data(self) -> Any:
        return self.items, self.labels

    def _loss(self, model: Any, part: list[int], z: float | None) -> tuple[torch.Tensor, dict]:
        ref = None if self.ref is None else self.ref[part]
        return preference_loss(model, [self.items[i] for i in part], [self.labels[i] for i in part], ref, self.cfg, z)

    def _kto_reference_point(self, run: Run, mine: list[int]) -> float | None:
        """KTO's z over the whole step (a no-grad pass; only needed when the step is split)."""
        if self.cfg.loss != "kto" or (run.ctx.world == 1 and self.cfg.grad_accum == 1):
            return None
        with torch.no_grad(), run.amp():
            sums, _ = run.model.forward(sequence_logps, [self.items[i][0] for i in mine])
        ratio_sum, count = run.ctx.sum(float((sums.float().cpu() - self.ref[mine, 0]).sum()), len(mine))
        return float(kto_reference_point(torch.tensor([ratio_sum / count]), torch.zeros(1)))

    def step(self, run: Run, indices: list[int], step: int) -> dict[str, Any]:
        cfg = self.cfg
        mine = run.ctx.shard(indices)
        z = self._kto_reference_point(run, mine)
        totals: dict[str, float] = {}
        loss_sum = 0.0
        for part in run.micro_batches(mine, cfg.grad_accum):
            with run.amp():
                losses, stats = run.model.forward(self._loss, part, z)
            loss = row_mean(losses.float(), num_rows=len(indices))
            run.backward(loss)
            loss_sum += float(loss.detach())
            for key, value in stats.items():
                if value.dim():
                    totals[key] = totals.get(key, 0.0) + float(value.float().sum())
        finite, grad_norm, loss_value = run.update(loss_sum)
        keys = sorted(totals)
        sums = run.ctx.sum(*(totals[k] for k in keys))
        return {
            "finite": finite,
            "loss": loss_value,
            "grad_norm": grad_norm,
            **{k: v / len(indices) for k, v in zip(keys, sums)},
        }

    def evaluate(self, run: Run) -> dict[str, float]:
        """Mean loss and preference accuracy (implicit chosen reward > rejected) on held-out rows."""
        if not self.eval_items:
            return {}
        loss_sum, right, counted = 0.0, 0.0, 0
        chunks = even_chunks(run.ctx, list(range(len(self.eval_items))), forward_rows(self.cfg))
        with run.evaluating():
            z = self._eval_reference_point(run, chunks) if self.cfg.loss == "kto" else None
            for chunk, real in chunks:
                items = [self.eval_items[i] for i in chunk]
                labels = [self.eval_labels[i] for i in chunk]
                ref = None if self.eval_ref is None else self.eval_ref[chunk]
                with run.amp():
                    losses, stats = run.model.forward(
                        lambda m, it=items, lb=labels, rf=ref: preference_loss(m, it, lb, rf, self.cfg, z)
                    )
                if real:
                    loss_sum += float(losses.float().sum())
                    right += float(stats["accuracy"].float().sum()) if "accuracy" in stats else 0.0
                    counted += len(chunk)
        loss_sum, right, counted = run.ctx.sum(loss_sum, right, counted)
        out = {"eval_loss": loss_sum / counted}
        if self.cfg.loss != "kto":
            out["eval_preference_accuracy"] = right / counted
        return out

    def _eval_reference_point(self, run: Run, chunks: list[tuple[list[int], bool]]) -> float:
        """KTO's z over the whole held-out set (all ranks), so the held-out loss does not depend on chunking."""
        ratio, n = 0.0, 0
        for chunk, real in chunks:
            with run.amp():
                sums, _ = run.model.forward(sequence_logps, [self.eval_items[i][0] for i in chunk])
            if real:
                ratio += float((sums.float().cpu() - self.eval_ref[chunk, 0]).sum())
                n += len(chunk)
        ratio, n = run.ctx.sum(ratio, n)
        return max(0.0, ratio / n)

    def summary(self, run: Run) -> dict[str, Any]:
        return {"loss": self.cfg.loss, **self.counts}


def run_dpo(cfg: Any, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run preference optimisation and write the run directory; returns the summary."""
    return run_stage(DPOStage(cfg), stop_after=stop_after)


def cached_reference(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached reference log-probs at ``path`` if they were computed for ``key`` (model and data), else None
    (absent, unreadable, or from another model or data: then they are recomputed)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    except Exception:  # noqa: BLE001 - a corrupt cache is recomputed, whatever safetensors raises
        return None


def load_reference(run_dir: Path) -> dict[str, torch.Tensor]:
    """The reference log-probs a DPO run saved (``train`` and, if any, ``eval``)."""
    return load_file(str(Path(run_dir) / "reference_logps.safetensors"))
