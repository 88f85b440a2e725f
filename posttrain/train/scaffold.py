"""The one training scaffold: every stage is set up, stepped, logged, evaluated, checkpointed, resumed, timed and
summarised here. A stage (``train/sft.py``, ``dpo.py``, ``rm.py``, ``grpo.py``, ``ppo.py``) only says how to build
its model and data, what one optimiser step computes, and how to evaluate.

Read :func:`run_stage` top to bottom. Under ``torchrun`` every rank runs it: the global batch is drawn by one
seeded sampler on every rank and each rank takes its disjoint share (:meth:`DistContext.shard`), stages reduce
their losses with the token and row counts of the *whole* step (so N ranks x M micro-batches give the gradient
of the full batch), and rank 0 alone writes the run directory.

    >>> import tempfile
    >>> from posttrain.config import build_config, SFTConfig
    >>> from posttrain.train.sft import LMStage
    >>> cfg = build_config(SFTConfig, {"out": tempfile.mkdtemp(), "max_steps": 2, "batch_size": 2,
    ...                                "progress": False}, path="sft")
    >>> run_stage(LMStage(cfg, name="sft"))["steps"]
    2
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm
from transformers import get_scheduler

from posttrain.config import LORA_METHODS, adapter_method, to_dict
from posttrain.data.batching import ResumableSampler
from posttrain.distributed import (
    DistContext,
    Parallel,
    init,
    load_optimizer_state,
    optimizer_state,
    peak_memory_mb,
    reset_peak_memory,
)
from posttrain.errors import ConfigError, TrainingError
from posttrain.losses.regularize import l2sp_gradient_
from posttrain.rundir import RunDir, check_run_dir, claim, replace_dir, write_atomic
from posttrain.train.checkpoint import latest_checkpoint, read_checkpoint, rng_state, write_checkpoint
from posttrain.train.metrics import MetricsLog


class Stage:
    """What a training stage provides. The scaffold calls, in order: ``build`` (model and data, on every rank,
    before any wrapping), ``step`` once per optimiser step, ``evaluate`` on the eval cadence, ``save_final`` and
    ``summary`` at the end. ``extra_state``/``load_extra_state`` carry stage state (e.g. a KL controller) through
    checkpoints."""

    name: str = "train"

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def build(self, ctx: DistContext) -> tuple[torch.nn.Module, Any]:
        """(module to train, tokenizer); load data here."""
        raise NotImplementedError

    def rows_per_step(self) -> tuple[int, int]:
        """(size of the data set the sampler draws from, rows drawn per optimiser step over all ranks)."""
        raise NotImplementedError

    def prepare(self, run: Run) -> None:
        """Set-up that needs the wrapped model (engines, references). Optional."""

    def step(self, run: Run, indices: list[int], step: int) -> dict[str, Any]:
        """One optimiser step over the global batch ``indices`` (this rank takes ``run.ctx.shard(indices)``).
        Must call ``run.update`` (once, or once per inner update); returns the record to log (global values)."""
        raise NotImplementedError

    def evaluate(self, run: Run) -> dict[str, float]:
        """Held-out metrics (keys start with ``eval_``), identical on every rank; {} when there is nothing."""
        return {}

    def save_final(self, run: Run, path: Path) -> None:
        """Write ``final/`` (rank 0; ``run.final_state()`` has the gathered weights)."""
        from posttrain.models.loading import save_model_dir

        save_model_dir(run.model.module, run.tokenizer, path, state_dict=run.final_state())

    def summary(self, run: Run) -> dict[str, Any]:
        """Stage-specific summary fields."""
        return {}

    def training_data(self) -> Any:
        """What the stage trains on (examples, pairs, prompt rows), fingerprinted into every checkpoint so that a
        resume on different data is refused."""
        raise NotImplementedError

    def watch(self, run: Run, step: int, record: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
        """(alerts this step's record raises, whether it holds the best gold score so far: then the scaffold
        writes ``best/``). The RL stages run the reward-hacking monitor here; others have nothing to watch."""
        return [], False

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class Run:
    """What a stage's step sees: config, ranks, the wrapped model, tokenizer, optimiser and the update call."""

    cfg: Any
    ctx: DistContext
    model: Parallel
    tokenizer: Any
    run_dir: Path
    optimizer: torch.optim.Optimizer | None = None
    params: list = field(default_factory=list)
    updates: int = 0
    anchor: list | None = None  # the trainable weights at the stage's start (L2-SP)
    l2sp_distance: float | None = None
    _full: dict | None = None

    def amp(self) -> Any:
        """bf16 autocast when ``mixed_precision: bf16``, else nothing."""
        if self.cfg.mixed_precision == "bf16":
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this rank's share of the step's loss. Shares are normalised by whole-step counts, so the
        gradient wanted is their *sum* over ranks; DDP and FSDP average, hence the factor ``world``."""
        (loss * self.ctx.world).backward()

    def no_sync(self, last: bool) -> Any:
        """Skip DDP's gradient all-reduce on every micro-batch but the last of a step."""
        wrapped = self.model._wrapped
        if last or not hasattr(wrapped, "no_sync"):
            return nullcontext()
        return wrapped.no_sync()

    def micro_batches(self, rows: list, accum: int) -> Iterator[list]:
        """``rows`` (this rank's share of the step) in ``accum`` equal micro-batches; the caller's forward and
        backward of each run under DDP's ``no_sync`` but for the last, so gradients are all-reduced once."""
        size = len(rows) // accum
        for k in range(accum):
            with self.no_sync(last=k == accum - 1):
                yield rows[k * size : (k + 1) * size]

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """The model in eval mode (no dropout) and without gradients, restored afterwards."""
        module = self.model.module
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            module.train(was_training)

    def update(self, local_loss: float) -> tuple[bool, float, float]:
        """Clip and apply the accumulated gradient unless the step's loss or gradient is non-finite (then nothing
        reaches the weights). ``local_loss`` is this rank's share; returns (finite, gradient norm, global loss)."""
        (loss,) = self.ctx.sum(local_loss)
        if self.anchor is not None:
            self.l2sp_distance = l2sp_gradient_(self.params, self.anchor, self.cfg.l2sp)
        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return finite, grad_norm, loss

    def last_logged(self, key: str) -> Any:
        """The last value of ``key`` in metrics.jsonl (read on rank 0; None elsewhere, and the scaffold hands
        every rank rank 0's summary)."""
        records = MetricsLog(self.run_dir / "metrics.jsonl").read() if self.ctx.is_main else []
        return next((r[key] for r in reversed(records) if r.get(key) is not None), None)

    def final_state(self) -> dict[str, torch.Tensor] | None:
        """Full weights for saving (gathered once at the end under FSDP2); None when the module holds them."""
        return self._full


def forward_rows(cfg: Any) -> int:
    """Rows per forward in no-grad passes (held-out loss, reference log-probs): the training micro-batch, which
    the user sized to fit with gradients, so these passes fit too (a fixed 64 rows of 49k-vocabulary logits took
    9.8 GB in a 135 M LoRA run).

    >>> from types import SimpleNamespace
    >>> forward_rows(SimpleNamespace(batch_size=32, grad_accum=4))
    8
    """
    return max(1, cfg.batch_size // max(1, getattr(cfg, "grad_accum", 1)))


def even_chunks(ctx: DistContext, items: list, size: int) -> list[tuple[list, bool]]:
    """This rank's share of ``items`` in chunks of at most ``size``, the same number of chunks on every rank
    (FSDP2 gathers parameters in every forward, so all ranks must run the same forwards): a rank with fewer
    items gets stand-in chunks, flagged False, whose results it must ignore.

    >>> from posttrain.distributed import DistContext
    >>> ctx = DistContext(rank=1, world=2, local_rank=1, device=torch.device("cpu"))
    >>> even_chunks(ctx, [10, 11, 12, 13, 14], 2)
    [([11, 13], True), ([10], False)]
    """
    mine = ctx.shard(items)
    chunks = max(1, math.ceil(math.ceil(len(items) / ctx.world) / size))
    return [
        (mine[k * size : (k + 1) * size], True) if mine[k * size : (k + 1) * size] else (items[:1], False)
        for k in range(chunks)
    ]


def make_optimizer(params: list, cfg: Any) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not norms or biases), as in most LLM recipes."""
    if not params:
        raise ConfigError("model: nothing to train (no parameter requires grad)")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel halves the optimiser step on CPU (51 -> 26 ms on the 25 M model, 2 threads) and runs on GPU;
    # sharded (DTensor) parameters take the default implementation.
    fused = not any(hasattr(p, "device_mesh") for p in params)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused
    )


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Any) -> Any:
    """Linear warm-up, then cosine, linear or constant, over ``cfg.max_steps`` (transformers' schedules)."""
    return get_scheduler(
        cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.max_steps,
    )


def step_scheduler(scheduler: Any) -> float:
    """Advance the learning-rate schedule; returns the rate the step just taken used. (A skipped first step
    makes torch warn about the call order; the order is right, so the warning is silenced.)"""
    lr = scheduler.get_last_lr()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    return lr


# Keys that may differ between a checkpoint and the run resuming it: how long to go on and how to watch it, not
# what is trained (README, "Reliability"). The learning-rate schedule is recomputed over the new max_steps.
RESUMABLE_KEYS = frozenset(
    {
        "out",
        "max_steps",
        "save_every",
        "keep_checkpoints",
        "eval_every",
        "log_every",
        "resume",
        "overwrite",
        "progress",
        "max_bad_steps",
        "threads",
        "device",
        "eval_data",
        "eval_limit",
        "reward_timeout_s",
        "reward_on_error",
        "gradient_checkpointing",  # same gradients (tests/test_memory.py), only memory and time change
    }
)


def prepare_run_dir(cfg: Any, stage: str, ctx: DistContext) -> RunDir:
    """Claim the run directory (refused if it holds a run and neither resume nor overwrite says what to do;
    locked against a second run) and write the resolved ``config.yaml`` (rank 0)."""
    if not cfg.out:
        raise ConfigError(f"{stage}.out: a run directory is required (--out DIR)")
    key = f"{stage}.out"
    check_run_dir(cfg.out, key=key, resume=cfg.resume, overwrite=cfg.overwrite)  # every rank, before any writes
    ctx.barrier()
    # Rank 0 alone claims (locks, removes an overwritten run, marks); the others only checked, before its writes.
    run = claim(cfg.out, key=key, resume=cfg.resume, overwrite=cfg.overwrite) if ctx.is_main else RunDir(Path(cfg.out))
    if ctx.is_main:
        resolved = {"stage": stage, "world_size": ctx.world, **to_dict(cfg)}
        write_atomic(run.path / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    ctx.barrier()
    return run


def fingerprint(obj: Any) -> str:
    """A short content hash of what a stage trains on (examples, rows, pairs): equal data, equal hash.

    >>> fingerprint([{"prompt": "1+1=", "answer": "2"}]) == fingerprint([{"answer": "2", "prompt": "1+1="}])
    True
    """
    text = json.dumps(obj, sort_keys=True, default=_plain, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _plain(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        raw = obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"tensor": [str(obj.dtype), list(obj.shape), hashlib.sha256(raw).hexdigest()]}
    if hasattr(obj, "__dataclass_fields__"):
        return {name: getattr(obj, name) for name in obj.__dataclass_fields__}
    return repr(obj)


def model_fingerprint(module: torch.nn.Module) -> str:
    """A hash of the starting weights (each tensor's name, shape and, for large tensors, a strided sample and the
    sum: a different checkpoint differs there, and hashing every byte of a 7 B model would take seconds)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        if flat.numel() > 65536:
            flat = torch.cat([flat[:: flat.numel() // 65536][:65536], flat.float().sum().reshape(1).to(flat.dtype)])
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def run_fingerprint(cfg: Any, stage: Stage, module: torch.nn.Module) -> dict[str, Any]:
    """What a checkpoint records so that ``--resume`` can refuse a different config, data or starting model."""
    config = {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_KEYS}
    return {"config": config, "data": fingerprint(stage.training_data()), "model": model_fingerprint(module)}


def check_fingerprint(saved: dict[str, Any] | None, now: dict[str, Any], checkpoint: Path, stage: str) -> None:
    """Refuse to resume ``checkpoint`` when the config, the data or the starting model changed; the message names
    every changed key."""
    if not saved:
        return  # written before fingerprints existed
    changed = [
        f"{k} {saved['config'].get(k)!r} -> {now['config'].get(k)!r}"
        for k in sorted(set(saved["config"]) | set(now["config"]))
        if saved["config"].get(k) != now["config"].get(k)
    ]
    if saved.get("data") != now["data"]:
        changed.append("the training data (its content differs from what the checkpoint trained on)")
    if saved.get("model") != now["model"] and not any(c.startswith("model ") for c in changed):
        changed.append("the starting model's weights")
    if changed:
        raise ConfigError(
            f"{stage}.resume: {checkpoint} was trained with a different setup: {'; '.join(changed)}. Resume with the"
            f" same settings (may change: {', '.join(sorted(RESUMABLE_KEYS - {'out', 'resume', 'overwrite'}))}),"
            " or start a new run (--overwrite or another --out)"
        )


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_stage(stage: Stage, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run ``stage`` to ``cfg.max_steps`` and write its run directory; returns the summary (on every rank).

    ``stop_after`` returns right after that step, as if the process had died there (for resume tests)."""
    cfg = stage.cfg
    ctx = init(cfg.device)
    claimed = prepare_run_dir(cfg, stage.name, ctx)
    try:
        with _threads(cfg.threads):
            return _run(stage, cfg, ctx, claimed.path, stop_after)
    finally:
        claimed.release()


def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    """Recompute every decoder layer's activations in the backward pass instead of keeping them (the model is
    found inside PPO's policy-with-value and inside peft's wrapper). The backward runs after the forward's
    ``packed_attention`` block has closed, so each layer's recompute is run under the attention implementation
    its forward used: under the model's own, packed sequences would attend to each other.

    >>> from posttrain.models.tiny import build_model, build_tokenizer
    >>> model = build_model(build_tokenizer())
    >>> enable_gradient_checkpointing(model)
    >>> model.model.layers[0].gradient_checkpointing
    True
    """
    from posttrain.models.varlen import attention_implementation

    model = getattr(module, "policy", module)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing: {type(model).__name__} does not support it")
    config = model.config

    def same_attention() -> tuple[Any, Any]:
        return nullcontext(), attention_implementation(model, config._attn_implementation)

    kwargs = {"use_reentrant": False, "context_fn": same_attention}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _save_best(run: Run, stage: Stage, run_dir: Path) -> None:
    """``best/`` beside ``final/``: the model at the step with the best gold score so far, written whole and then
    moved into place (a crash never leaves half of one)."""
    run._full = run.model.full_state(trainable_only=False) if run.model.sharded else None  # every rank
    if run.ctx.is_main:
        tmp = run_dir / ".best.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        stage.save_final(run, tmp)
        replace_dir(tmp, run_dir / "best")
    run._full = None
    run.ctx.barrier()


def _run(stage: Stage, cfg: Any, ctx: DistContext, run_dir: Path, stop_after: int | None) -> dict[str, Any]:
    started = time.perf_counter()
    reset_peak_memory(ctx.device)  # this stage's own peak, whatever ran before it in this process
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    module, tokenizer = stage.build(ctx)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(module)
    stamp = run_fingerprint(cfg, stage, module)
    module.to(ctx.device)
    module.train()
    run = Run(cfg, ctx, Parallel(module, ctx, fsdp=cfg.fsdp), tokenizer, run_dir)
    run.params = [p for p in module.parameters() if p.requires_grad]
    if getattr(cfg, "l2sp", 0.0) > 0:  # before any resume: the anchor is the stage's starting model
        run.anchor = [p.detach().clone() for p in run.params]
    run.optimizer = make_optimizer(run.params, cfg)
    scheduler = make_scheduler(run.optimizer, cfg)
    size, per_step = stage.rows_per_step()
    sampler = ResumableSampler(size, seed=cfg.seed)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=ctx.is_main)
    state = {"step": 0, "skipped_steps": 0, "bad_in_row": 0, "tokens": 0, "sampler": sampler.state_dict()}
    state["world_size"] = ctx.world
    state["stage"] = stage.extra_state()
    state["fingerprint"] = stamp
    checkpoint = latest_checkpoint(run_dir) if cfg.resume else None
    if checkpoint is not None:
        state = restore(checkpoint, run, scheduler, ctx)
        check_fingerprint(state.get("fingerprint"), stamp, checkpoint, stage.name)
        state["fingerprint"] = stamp  # a longer max_steps etc. is recorded from now on
        sampler.load_state_dict(state["sampler"])
        stage.load_extra_state(state["stage"])
        log.truncate_after(state["step"])
    else:
        log.reset()
    resumed_from = state["step"] if checkpoint is not None else None
    stage.prepare(run)
    if cfg.eval_every and state["step"] == 0:
        record = {"step": 0, **stage.evaluate(run)}
        alerts, best = stage.watch(run, 0, record)
        log.write(record)
        if best:
            _save_best(run, stage, run_dir)

    bar = tqdm(
        total=cfg.max_steps,
        initial=state["step"],
        desc=stage.name,
        unit="step",
        disable=not (cfg.progress and ctx.is_main),
    )
    train_time, start_tokens = 0.0, state["tokens"]
    evaluated_last = False
    while state["step"] < cfg.max_steps:
        step = state["step"] + 1
        t0 = time.perf_counter()
        record = stage.step(run, sampler.take(per_step), step)
        finite = record.pop("finite")
        state["bad_in_row"] = 0 if finite else state["bad_in_row"] + 1
        state["skipped_steps"] += 0 if finite else 1
        lr = step_scheduler(scheduler)
        step_s = time.perf_counter() - t0
        train_time += step_s
        tokens = int(record.pop("tokens", 0))
        state.update(
            step=step, tokens=state["tokens"] + tokens, sampler=sampler.state_dict(), stage=stage.extra_state()
        )
        record = {"step": step, "lr": lr, **record, "skipped_steps": state["skipped_steps"], "step_s": round(step_s, 4)}
        if run.l2sp_distance is not None:
            record["l2sp_distance"] = run.l2sp_distance
        if tokens:
            record.update(tokens=state["tokens"], tokens_per_s=tokens / max(step_s, 1e-9))
        if not finite:
            record["skipped"] = True
        evaluated_last = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps
        if evaluated_last:
            record.update(stage.evaluate(run))
        alerts, best = stage.watch(run, step, record)
        state["stage"] = stage.extra_state()  # the monitor has seen this step: a checkpoint resumes after it
        if alerts:
            record["alerts"] = alerts
            state["alerts"] = state.get("alerts", 0) + len(alerts)
        # The console hears of a rule when it starts firing (metrics.jsonl gets it at every step it holds).
        firing = sorted({a["alert"] for a in alerts})
        if ctx.is_main:
            for alert in alerts:
                if alert["alert"] not in state.get("firing", []):
                    bar.write(f"{stage.name} step {step}: ALERT {alert['alert']}: {alert['message']}")
        state["firing"] = firing
        if step % cfg.log_every == 0 or step == cfg.max_steps or not finite or evaluated_last or alerts:
            log.write(record)
        if best:
            _save_best(run, stage, run_dir)
        if alerts and getattr(cfg, "on_hacking", "warn") == "stop":
            state["stopped_by_monitor"] = step
            save(run, scheduler, state, keep=cfg.keep_checkpoints)
            break
        bar.update(1)
        if "loss" in record and record["loss"] is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        if state["bad_in_row"] >= cfg.max_bad_steps:
            bar.close()
            raise TrainingError(
                f"{stage.name}: stopped at step {step} after {state['bad_in_row']} non-finite losses or gradients in"
                f" a row; no such step was applied. Last good checkpoint: {latest_checkpoint(run_dir) or 'none'}."
                " Try a lower lr."
            )
        # No checkpoint in the middle of a non-finite streak: the last good one must survive the rotation.
        if ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps) and state["bad_in_row"] == 0:
            save(run, scheduler, state, keep=cfg.keep_checkpoints)
        if stop_after is not None and step >= stop_after:
            bar.close()
            return {"stage": stage.name, "steps": step, "stopped_early": True}
    bar.close()

    run._full = run.model.full_state(trainable_only=False) if run.model.sharded else None
    if ctx.is_main:
        stage.save_final(run, run_dir / "final")
    ctx.barrier()
    metrics = log.read() if ctx.is_main else []
    last_eval = next((m for m in reversed(metrics) if any(k.startswith("eval_") for k in m)), {})
    last_train = next((m for m in reversed(metrics) if "loss" in m and m.get("step", 0) > 0), {})
    summary = {
        "stage": stage.name,
        "model": cfg.model,
        "final": str(run_dir / "final"),
        "world_size": ctx.world,
        "parallel": ("fsdp" if cfg.fsdp else "ddp") if ctx.distributed else "none",
        "device": str(ctx.device),
        "lora": adapter_method(cfg) in LORA_METHODS,
        "peft": adapter_method(cfg),
        "parameters": sum(_numel(p) for p in module.parameters()),
        "trainable_parameters": sum(_numel(p) for p in run.params),
        "steps": state["step"],
        "skipped_steps": state["skipped_steps"],
        "resumed_from": resumed_from,
        "final_train_loss": last_train.get("loss"),
        "heldout": {k[5:]: v for k, v in last_eval.items() if k.startswith("eval_")},
        "alerts": state.get("alerts", 0),
        "stopped_by_monitor": state.get("stopped_by_monitor"),
        "best": str(run_dir / "best") if (run_dir / "best").exists() else None,
        "train_wall_s": round(train_time, 3),
        "wall_s": round(time.perf_counter() - started, 3),
        "tokens": state["tokens"],
        "tokens_per_s": round((state["tokens"] - start_tokens) / max(train_time, 1e-9), 1),
        "peak_memory_mb": round(peak_memory_mb(ctx.device), 1),
        **stage.summary(run),
    }
    summary = ctx.all_gather_objects(summary)[0]  # rank 0 read the metrics: every rank returns its summary
    if ctx.is_main:
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def _numel(p: torch.Tensor) -> int:
    shape = getattr(p, "shape", None)
    return math.prod(shape) if shape is not None else p.numel()


def save(run: Run, scheduler: Any, state: dict, *, keep: int) -> None:
    """Gather (FSDP2) and write a checkpoint from rank 0; every rank must call."""
    weights = run.model.full_state(trainable_only=True)
    opt_state = optimizer_state(run.optimizer) if run.model.sharded else run.optimizer.state_dict()
    rngs = run.ctx.all_gather_objects(rng_state())
    if run.ctx.is_main:
        sched = scheduler.state_dict()
        write_checkpoint(run.run_dir, state["step"], weights, opt_state, sched, state, keep=keep, rng_states=rngs)
    run.ctx.barrier()


def restore(path: Path, run: Run, scheduler: Any, ctx: DistContext) -> dict:
    """Load a checkpoint into every rank (weights, optimiser, scheduler, RNG); returns the trainer state."""
    weights, opt_state, sched_state, state = read_checkpoint(path, rank=ctx.rank)
    missing = [n for n, p in run.model.module.named_parameters() if p.requires_grad and n not in weights]
    if missing:
        raise TrainingError(f"{path}: checkpoint lacks trainable weights {missing[:3]}")
    run.model.load_full_state(weights)
    if run.model.sharded:
        load_optimizer_state(run.optimizer, opt_state)
    else:
        run.optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(sched_state)
    if state.get("world_size", ctx.world) != ctx.world:
        raise ConfigError(
            f"resume: {path} was written by {state['world_size']} processes, this job has {ctx.world};"
            " resume with the same --nproc_per_node"
        )
    return state
