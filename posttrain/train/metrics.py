"""The run directory's ``metrics.jsonl``: one JSON object per logged step, resumable."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSONL log. On resume, lines past the checkpoint's step are dropped, so the file reads as one
    uninterrupted run.

        >>> import tempfile
        >>> log = MetricsLog(Path(tempfile.mkdtemp()) / "metrics.jsonl")
        >>> log.write({"step": 1, "loss": 2.0}); log.write({"step": 2, "loss": 1.5}); log.truncate_after(1)
        >>> log.read()
        [{'step': 1, 'loss': 2.0}]
    """

    def __init__(self, path: Path, *, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled  # under torchrun only rank 0 writes
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        if not self.enabled:
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def reset(self) -> None:
        if not self.enabled:
            return
        self.path.write_text("")
