"""The pinned tiny-model SFT run shared by tests/test_pinned.py and scripts/regen_golden.py."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden" / "sft_tiny_loss.json"
GRPO_GOLDEN = Path(__file__).parent / "golden" / "grpo_tiny.json"


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


def pinned_grpo_curve() -> dict[str, list[float]]:
    """Four GRPO steps from the shipped base (2 prompts x 4 samples, lenient-correct + length rewards);
    returns the per-step reward means and gradient norms (the loss itself is ~0 at ratio 1 by construction)."""
    from posttrain.train.grpo import run_grpo

    with tempfile.TemporaryDirectory() as out:
        run_grpo(grpo_config(out))
        records = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"reward_mean": [r["reward_mean"] for r in records], "grad_norm": [r["grad_norm"] for r in records]}


def grpo_config(out: str | Path, **overrides: object) -> object:
    """The small GRPO config shared by the pinned run and tests/test_grpo.py (2 prompts x 4 samples, 4 steps)."""
    from posttrain.config import GRPOConfig, build_config

    values = {
        "model": "builtin:tiny-base",
        "data": "task:arithmetic:val",
        "out": str(out),
        "max_steps": 4,
        "batch_prompts": 2,
        "group_size": 4,
        "max_new_tokens": 24,
        "lr": 1e-4,
        "log_every": 1,
        "progress": False,
        "seed": 0,
        "reward": ["correct_lenient", "length_penalty"],
        "reward_weights": [1.0, 0.5],
    }
    return build_config(GRPOConfig, {**values, **overrides}, path="grpo")
