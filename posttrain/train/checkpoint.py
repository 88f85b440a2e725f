"""Atomic, resumable checkpoints: ``checkpoints/step_N/`` holds the full training state.

A checkpoint is written into ``checkpoints/.tmp-step_N``; ``MANIFEST.json`` (every file with its size) is written
last and the directory is then renamed, so a run killed at any moment leaves either a complete checkpoint or a
temp directory that resume ignores. Weights are safetensors; optimiser, scheduler and RNG states are loaded with
``torch.load(weights_only=True)``.

    >>> import tempfile, torch
    >>> run = Path(tempfile.mkdtemp())
    >>> _ = write_checkpoint(run, 3, {"w": torch.zeros(2)}, {}, {}, {"step": 3}, keep=2)
    >>> latest_checkpoint(run).name
    'step_3'
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from posttrain.errors import TrainingError

MANIFEST = "MANIFEST.json"


def write_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    state: dict,
    *,
    keep: int,
    rng_states: list[dict] | None = None,
) -> Path:
    """Write ``checkpoints/step_{step}`` atomically and keep only the newest ``keep`` complete ones. ``weights`` are
    the trainable parameters by name (all weights for a full fine-tune, the adapters for LoRA), full tensors."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".tmp-step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in weights.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler_state, tmp / "scheduler.pt")
    torch.save({"ranks": rng_states or [rng_state()]}, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    for name in files:
        _fsync(tmp / name)
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}))
    _fsync(tmp / MANIFEST)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _is_complete(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / n).stat().st_size == size for n, size in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; temp and partial directories are ignored."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if p.name[5:].isdigit() and _is_complete(p)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``run_dir``, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    """This process's random-number state: torch (CPU and every CUDA device) and Python's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_checkpoint(path: Path, *, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """(trainable weights, optimiser state, scheduler state, trainer state) of a checkpoint; restores this rank's
    random-number state (each rank's was saved: dropout draws differ per rank)."""
    name = "trainable.safetensors"
    try:
        weights = load_file(str(path / name))
        name = "optimizer.pt"
        optimizer_state = torch.load(path / name, weights_only=True)
        name = "scheduler.pt"
        scheduler_state = torch.load(path / name, weights_only=True)
        name = "rng.pt"
        rng = torch.load(path / name, weights_only=True)
        ranks = rng["ranks"] if "ranks" in rng else [rng]
        set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
        name = "trainer_state.json"
        state = json.loads((path / name).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step recorded")
    except Exception as err:  # noqa: BLE001 - whatever a damaged file makes the readers raise
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise TrainingError(
            f"{path / name}: corrupt checkpoint ({reason}); delete {path} to resume from the one before it, or start"
            " over with --overwrite"
        ) from None
    return weights, optimizer_state, scheduler_state, state


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
