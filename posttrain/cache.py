"""Where generated artifacts are cached: ``$POSTTRAIN_CACHE``, else ``$XDG_CACHE_HOME/posttrain``, else
``~/.cache/posttrain``.

Built-in task splits are written once as JSONL files there, so they flow through the same reader (and the same
``file:line`` error messages) as user data, and can be inspected or reused with other tools.

    >>> path = task_file("uppercase", "test")
    >>> path.name, path.exists()
    ('test.jsonl', True)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """The cache root (created if missing)."""
    root = os.environ.get("POSTTRAIN_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "posttrain") if xdg else str(Path.home() / ".cache" / "posttrain")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cached_jsonl(path: Path, make_rows: Callable[[], list[dict]]) -> Path:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with tmp.open("w") as f:
            for row in make_rows():
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return path


def task_file(name: str, split: str) -> Path:
    """The JSONL file of a built-in task split (generated on first use)."""
    from posttrain.tasks import get_task

    task = get_task(name)
    return _cached_jsonl(cache_dir() / "data" / f"{name}-v{task.version}" / f"{split}.jsonl", lambda: task.rows(split))


def corpus_file(split: str) -> Path:
    """The JSONL file of the generated pretraining corpus split."""
    from posttrain.tasks.corpus import VERSION, corpus_rows

    return _cached_jsonl(cache_dir() / "data" / f"corpus-v{VERSION}" / f"{split}.jsonl", lambda: corpus_rows(split))
