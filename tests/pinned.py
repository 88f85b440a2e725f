"""The pinned tiny-model SFT run shared by tests/test_pinned.py and scripts/regen_golden.py."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden" / "sft_tiny_loss.json"


def pinned_sft_losses() -> list[float]:
    """Train a fresh seeded tiny model for 8 steps on 32 arithmetic rows; return the per-step losses."""
    from posttrain.config import SFTConfig, build_config
    from posttrain.models.tiny import build_model, build_tokenizer
    from posttrain.train.data_prep import prepare_examples
    from posttrain.train.loop import train

    tok = build_tokenizer()
    model = build_model(tok, seed=0)
    rows = [{k: r[k] for k in ("prompt", "completion")} for r in _rows()]
    data = prepare_examples(rows, tok, kind="sft", max_length=256, length_policy="truncate", completion_only=True)
    with tempfile.TemporaryDirectory() as out:
        values = {
            "out": out,
            "max_steps": 8,
            "batch_size": 4,
            "grad_accum": 2,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 1,
            "progress": False,
            "seed": 0,
        }
        train(model, data.examples, build_config(SFTConfig, values, path="sft"), Path(out))
        records = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _rows() -> list[dict]:
    from posttrain.tasks import get_task

    return get_task("arithmetic").rows("val", 32)
