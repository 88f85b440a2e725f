"""Ranks, devices and the data-parallel wrappers: everything that knows about ``torch.distributed``.

Under ``torchrun`` every process runs the same command; :func:`init` reads the rank and world size torchrun
sets, joins the process group (``nccl`` on GPUs, ``gloo`` on CPU) and picks the device. In one plain process it
returns rank 0 of a world of 1 and every helper here becomes a no-op, so the training code has one path.

Training code never calls the model's forward through the model itself: it hands a function to
:meth:`Parallel.forward`, which runs it inside the wrapper's forward (``DistributedDataParallel`` by default,
FSDP2 ``fully_shard`` with ``fsdp``), so the gradient hooks and parameter gathering of either wrapper see every
parameter the function touches (a value head, a score head, LoRA adapters alike).

    >>> ctx = init("cpu")
    >>> ctx.rank, ctx.world, ctx.is_main
    (0, 1, True)
    >>> ctx.shard(list(range(6)))
    [0, 1, 2, 3, 4, 5]
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from posttrain.errors import ConfigError


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory in MiB since the process started or :func:`reset_peak_memory`: memory allocated by tensors on a
    CUDA ``device`` (default: CUDA when available), else this process's peak resident set (``ru_maxrss``)."""
    if _is_cuda(device):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: torch.device | None = None) -> None:
    """Restart :func:`peak_memory_mb`'s peak from the memory in use now, so that each stage of a recipe (all run in
    one process) reports its own peak, not the largest of the stages before it.

    >>> reset_peak_memory(torch.device("cpu"))
    >>> peak_memory_mb(torch.device("cpu")) > 0
    True
    """
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: the peak resident set (ru_maxrss, VmHWM) restarts from the current one
    except OSError:
        pass  # elsewhere (macOS) it stays the peak since the process started


def _is_cuda(device: torch.device | None) -> bool:
    return device.type == "cuda" if device is not None else torch.cuda.is_available()


def resolve_device(spec: str, *, local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when available, else CPU. Under torchrun, ``cuda`` means this process's own GPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ConfigError(f"device: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {spec!r} asked for, but torch sees no CUDA device (use cpu or auto)")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank, world size, device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, checkpoints, the summary and ``final/``."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's part of a global batch: items ``rank, rank + world, ...`` (disjoint, together complete)."""
        return list(items[self.rank :: self.world])

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place sum (or max) over ranks; returns the tensor."""
        if self.distributed:
            moved = tensor.to(self.comm_device)
            dist.all_reduce(moved, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
            tensor.copy_(moved)
        return tensor

    def sum(self, *values: float) -> list[float]:
        """Python numbers summed over ranks (one collective for all of them)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along dim 0, in rank order (equal shapes on every rank)."""
        if not self.distributed:
            return tensor
        moved = tensor.to(self.comm_device)
        parts = [torch.empty_like(moved) for _ in range(self.world)]
        dist.all_gather(parts, moved)
        return torch.cat(parts).to(tensor.device)

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def comm_device(self) -> torch.device:
        """Where collectives run: the GPU under nccl, the CPU under gloo."""
        return self.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def init(device_spec: str = "auto") -> DistContext:
    """Join the torchrun job if there is one (idempotent) and return this process's context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank=local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=device)


def report_error_once(message: str) -> bool:
    """True for the first rank of the job to report an error (then it prints it), False for the others, so
    an error that every rank hits is printed once and one that a single rank hits is printed by that rank.
    Uses the key-value store torchrun's rendezvous already set up; without a job, always True."""
    if not dist.is_initialized():
        # Before the job is joined (arguments, config): every rank hits the same error; rank 0 says it.
        return int(os.environ.get("RANK", "0")) == 0
    try:
        store = dist.distributed_c10d._get_default_store()  # the job's TCPStore (no collective: peers may be stuck)
        return store.add("posttrain/errors", 1) == 1
    except Exception:  # noqa: BLE001 - the store may be gone with a dead peer; then say it ourselves
        return True


def another_rank_failed() -> bool:
    """Whether some rank of the job has already reported an error (then a failing collective here is only its
    consequence)."""
    if not dist.is_initialized():
        return False
    try:
        return dist.distributed_c10d._get_default_store().add("posttrain/errors", 0) > 0
    except Exception:  # noqa: BLE001 - the store went away with the agent: the job is failing anyway
        return True


class Forwarder(torch.nn.Module):
    """Runs a function of the model inside ``forward``, so DDP and FSDP2 wrap whatever the function computes."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.inner, *args, **kwargs)


class Parallel:
    """The trained module, wrapped for data parallelism (or not, in one process).

    ``module`` is the plain model (for attribute access, generation, saving); ``forward(fn, ...)`` runs
    ``fn(module, ...)`` through the wrapper and is the only way a training loss may be computed."""

    def __init__(self, module: torch.nn.Module, ctx: DistContext, *, fsdp: bool = False):
        self.module, self.ctx, self.fsdp = module, ctx, fsdp
        self._wrapped: torch.nn.Module = Forwarder(module)
        if fsdp and ctx.distributed:
            from torch.distributed.fsdp import fully_shard

            # Each decoder layer is its own shard group (gathered just for its forward/backward); the rest
            # (embeddings, final norm, heads) belong to the root group.
            for layer in _decoder_layers(module):
                fully_shard(layer)
            fully_shard(self._wrapped)
        elif ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # No buffer broadcast in every forward: the buffers (rotary tables) are the same on every rank, and
            # forwards under no_grad (reference and old log-probs) need not be matched by a collective.
            self._wrapped = DistributedDataParallel(
                self._wrapped,
                device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                forward_sync_buffers=False,
            )

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._wrapped(fn, *args, **kwargs)

    @property
    def sharded(self) -> bool:
        return self.fsdp and self.ctx.distributed

    def full_state(self, *, trainable_only: bool) -> dict[str, torch.Tensor]:
        """The module's parameters by name as full CPU tensors (FSDP2 gathers them; every rank must call)."""
        out = {}
        for name, p in self.module.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            t = p.detach()
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            out[name] = t.to("cpu", copy=True).contiguous()
        return out

    def load_full_state(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy full tensors into the (possibly sharded) parameters of the same names."""
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                p = params[name]
                if hasattr(p, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor

                    local = distribute_tensor(tensor.to(p.device, p.dtype), p.device_mesh, p.placements)
                    p.to_local().copy_(local.to_local())
                else:
                    p.copy_(tensor)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformer (the ``ModuleList`` with the most parameters)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    if not lists:
        return []
    best = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(best)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's state dict with FSDP2 shards gathered into full tensors (every rank must call)."""
    state = optimizer.state_dict()

    def full(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and hasattr(value, "full_tensor"):
            return value.full_tensor().cpu()
        return value

    state["state"] = {k: {n: full(v) for n, v in s.items()} for k, s in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimiser state into an optimiser over (possibly FSDP2-sharded) parameters: each state tensor
    shaped like its parameter is re-sharded like it. (State indices count parameters group by group.)"""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state["state"].items():
        p = params[int(index)]
        if isinstance(p, DTensor):
            for name, value in entry.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    entry[name] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
    optimizer.load_state_dict(state)
