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
    from posttrain.data.prepare import prepare_examples
    from posttrain.models.tiny import build_model, build_tokenizer
    from posttrain.train.sft import train

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


PREFERENCE_GOLDEN = Path(__file__).parent / "golden" / "preference_tiny.json"


def pinned_preference_curves() -> dict[str, list[float]]:
    """Four steps each of DPO, reward-model and PPO training from the shipped base on fixed rows; returns the
    per-step DPO losses and margins, RM losses and PPO score means and policy losses."""
    from posttrain.config import DPOConfig, PPOConfig, RMConfig, build_config
    from posttrain.tasks import get_task
    from posttrain.train.dpo import run_dpo
    from posttrain.train.ppo import run_ppo
    from posttrain.train.rm import run_rm

    common = {"model": "builtin:tiny-base", "max_steps": 4, "log_every": 1, "progress": False, "seed": 0}
    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = Path(tmp) / "pairs.jsonl"
        rows = get_task("arithmetic_prefs").rows("val", 16)
        pairs.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows))
        pref = {**common, "data": str(pairs), "batch_size": 4, "lr": 1e-3, "max_length": 256}
        run_dpo(build_config(DPOConfig, {**pref, "out": f"{tmp}/dpo"}, path="dpo"))
        run_rm(build_config(RMConfig, {**pref, "out": f"{tmp}/rm", "eval_data": str(pairs)}, path="rm"))
        ppo = {
            **common,
            "out": f"{tmp}/ppo",
            "data": "task:arithmetic:val",
            "batch_prompts": 2,
            "samples_per_prompt": 2,
            "max_new_tokens": 16,
            "lr": 1e-3,
            "reward": ["correct_lenient", "length_penalty"],
        }
        run_ppo(build_config(PPOConfig, ppo, path="ppo"))
        read = lambda name: [json.loads(x) for x in (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
        out["dpo_loss"] = [r["loss"] for r in read("dpo")]
        out["dpo_margin"] = [r["margin"] for r in read("dpo")]
        out["rm_loss"] = [r["loss"] for r in read("rm")]
        out["ppo_score_mean"] = [r["score_mean"] for r in read("ppo")]
        out["ppo_pg_loss"] = [r["pg_loss"] for r in read("ppo")]
    return out
