"""Run directories and output paths that lose nothing.

Rules every command follows (README, "Reliability"):

- an ``--out`` that already holds a run is refused unless ``--resume`` (continue it) or ``--overwrite`` (replace
  it) says what to do;
- nothing posttrain did not write is ever deleted: ``--overwrite`` removes only posttrain's own entries of a
  directory it marked as a run (``.posttrain-run``), and a model directory it wrote (``final/``, a merge result)
  lists its files in ``.posttrain-files.json``; a directory holding anything else is refused, never emptied;
- two runs cannot share one ``--out``: the first holds an exclusive lock (``.posttrain.lock``, released by the
  kernel when the process ends, however it ends) and the second stops with a message naming the first's pid;
- the output is checked before any work starts, so a run never loses its results to an unwritable path at the end.

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "run"
    >>> run = claim(out, key="sft.out")
    >>> (out / "config.yaml").write_text("stage: sft")
    10
    >>> run.release()
    >>> claim(out, key="sft.out")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    posttrain.errors.ConfigError: sft.out: ... already holds a run (config.yaml); pass --resume to continue it, ...
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from posttrain.errors import ConfigError

MARKER = ".posttrain-run"
LOCK = ".posttrain.lock"
FILES = ".posttrain-files.json"
# What posttrain writes at the top of a run directory (a stage's or a recipe's); the patterns also cover the
# per-split bad-row reports and reference caches.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "report.html", "recipe.yaml")
RUN_PATTERNS = ("bad_rows*.json", "reference_logps*.safetensors")
RUN_DIRS = ("checkpoints", "final", "base")


@dataclass
class RunDir:
    """A claimed run directory; holds its lock until :meth:`release` (or the process ends)."""

    path: Path
    _lock: IO[str] | None = None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None


def run_entries(path: Path) -> list[Path]:
    """posttrain's own entries present in ``path`` (files, checkpoints, final), sorted by name."""
    found = [path / n for n in (*RUN_FILES, *RUN_DIRS) if (path / n).exists()]
    for pattern in RUN_PATTERNS:
        found += path.glob(pattern)
    return sorted(set(found))


def check_run_dir(path: str | Path, *, key: str, resume: bool = False, overwrite: bool = False) -> Path:
    """Everything :func:`claim` checks, without writing anything (recipes check every stage up front)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a directory")
    _check_creatable(path, key)
    entries = run_entries(path) if path.is_dir() else []
    if not entries:
        return path
    if resume:
        for name in ("final", "base"):
            if (path / name).exists():
                _check_owned_model_dir(path / name, key)
        return path
    if not overwrite:
        names = ", ".join(e.name + ("/" if e.is_dir() else "") for e in entries)
        raise ConfigError(
            f"{key}: {path} already holds a run ({names}); pass --resume to continue it, --overwrite to replace it,"
            " or choose another --out"
        )
    if not (path / MARKER).is_file():
        raise ConfigError(
            f"{key}: {path} holds files posttrain did not mark as its own run ({entries[0].name}); --overwrite only"
            " replaces a posttrain run directory: move them away or choose another --out"
        )
    for entry in entries:
        if entry.name in ("final", "base"):
            _check_owned_model_dir(entry, key)
        elif entry.name == "checkpoints":
            _check_checkpoints(entry, key)
    return path


def claim(path: str | Path, *, key: str, resume: bool = False, overwrite: bool = False, lock: bool = True) -> RunDir:
    """Check ``path`` (see :func:`check_run_dir`), create it, lock it, and under ``overwrite`` remove the previous
    run's entries. ``lock=False`` checks only (the other ranks of a torchrun job: rank 0 locks)."""
    path = check_run_dir(path, key=key, resume=resume, overwrite=overwrite)
    if not lock:
        return RunDir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK, "a+")  # noqa: SIM115 - held open for the run's lifetime
    except OSError as err:
        raise ConfigError(f"{key}: cannot write to {path} ({err.strerror or err})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(
            f"{key}: {path} is in use by another posttrain run ({holder}); wait for it to finish or choose another"
            " --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    run = RunDir(path, handle)
    # Re-check under the lock: another run may have written between the first check and the lock.
    check_run_dir(path, key=key, resume=resume, overwrite=overwrite)
    if overwrite and not resume:
        for entry in run_entries(path):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    (path / MARKER).write_text(json.dumps({"created_by": "posttrain", "pid": os.getpid()}) + "\n")
    return run


def _check_creatable(path: Path, key: str) -> None:
    """The nearest existing ancestor of ``path`` is a directory we can write into."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}: cannot create {path}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot write to {probe} (permission denied)")


def _check_owned_model_dir(path: Path, key: str) -> None:
    foreign = foreign_files(path)
    if foreign:
        raise ConfigError(
            f"{key}: {path} holds files posttrain did not write ({', '.join(foreign[:3])}); move them away first:"
            " posttrain replaces only what it wrote"
        )


def _check_checkpoints(path: Path, key: str) -> None:
    for entry in path.iterdir():
        name = entry.name
        ours = entry.is_dir() and ((name.startswith("step_") and name[5:].isdigit()) or name.startswith(".tmp-step_"))
        if not ours:
            raise ConfigError(f"{key}: {path} holds {name!r}, which posttrain did not write; move it away first")


def foreign_files(path: Path) -> list[str]:
    """Files under the model directory ``path`` that its ``.posttrain-files.json`` does not list (all of them when
    there is no list: posttrain did not write that directory)."""
    try:
        listed = set(json.loads((path / FILES).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    present = [p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir()]
    return sorted(name for name in present if name not in listed and name != FILES)


def check_model_out(path: str | Path, *, key: str, overwrite: bool = False) -> Path:
    """An output model directory (``merge --out``): new or empty, or (with ``overwrite``) one posttrain wrote."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a directory")
    _check_creatable(path, key)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(f"{key}: {path} exists and is not empty; pass --overwrite or choose another --out")
        _check_owned_model_dir(path, key)
    return path


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory ``tmp`` to ``out``, listing its files in ``.posttrain-files.json``; an existing
    ``out`` is replaced only when posttrain wrote everything in it."""
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
    (tmp / FILES).write_text(json.dumps({"files": files}, indent=1) + "\n")
    if out.exists():
        _check_owned_model_dir(out, str(out))
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def temp_dir_for(out: Path) -> Path:
    """A fresh temporary directory next to ``out`` (same filesystem, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def check_output_file(path: str | Path, *, key: str, overwrite: bool = False) -> Path:
    """A results file (``eval --out``): its directory must be writable now, and an existing file is replaced only
    with ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{key}: {path} is a directory; give a file name such as {path / 'results.json'}")
    if path.exists() and not overwrite:
        raise ConfigError(f"{key}: {path} exists; pass --overwrite to replace it or choose another --out")
    _check_creatable(path.parent if str(path.parent) else Path("."), key)
    return path


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_tensors_atomic(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str]) -> None:
    """``safetensors`` file written through a temporary file and a rename, with ``metadata`` (e.g. its cache key)."""
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
