"""DPO speed: posttrain's ``dpo`` vs TRL's ``DPOTrainer`` on the same model, pairs, batch and lengths.

    python benchmarks/bench_dpo.py                        # small model, batch 8 pairs, max length 128, 3 repeats
    python benchmarks/bench_dpo.py --model tiny --steps 4 --repeats 1 --no-write

Both sides fp32, AdamW, lr 1e-6 cosine, clip 1.0, beta 0.1, sigmoid (DPO) loss, the generated arithmetic
preference pairs (``task:arithmetic_prefs``) truncated to 128 tokens. Timed: wall time of an optimiser step
after the warm-up (ours: the training scaffold's ``step_s`` in metrics.jsonl; TRL: between ``on_step_end``
callbacks). Not timed: model build, tokenisation, our one-off reference pass over the visited rows (TRL's
``precompute_ref_log_probs`` pass likewise, when on), our end of run (last checkpoint, ``final/`` model). TRL
runs in its default mode (a reference model forward every step) and with ``precompute_ref_log_probs=True``. MFU
counts 6N per trained token (the policy's forward and backward) on both sides, against the fp32 matmul peak
measured in the same rounds; tokens are the real (non-padding) tokens.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import RESULT_TAG, LoadMeter, machine_info, matmul_peak_flops, peak_rss_mib  # noqa: E402
from benchmarks.machine import run_worker as machine_run_worker  # noqa: E402


def _setup(spec: dict[str, Any]) -> tuple[Any, Any, list[dict]]:
    import torch

    torch.set_num_threads(spec["threads"])
    from posttrain.models.tiny import build_model, build_tokenizer
    from posttrain.tasks import get_task

    tok = build_tokenizer()
    model = build_model(tok, size=spec["model"], seed=0)
    rows = [
        {k: r[k] for k in ("prompt", "chosen", "rejected")} for r in get_task("arithmetic_prefs").rows("train", 512)
    ]
    return tok, model, rows


def _pair_tokens(tok: Any, rows: list[dict], max_length: int) -> float:
    """Mean real tokens per pair (chosen + rejected sequences, truncated to max_length each)."""
    total = 0
    for r in rows[:64]:
        for key in ("chosen", "rejected"):
            text = tok.apply_chat_template(r["prompt"] + r[key], tokenize=False)
            total += min(len(tok(text, add_special_tokens=False)["input_ids"]), max_length)
    return total / 64


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from posttrain.config import DPOConfig, build_config
    from posttrain.models.loading import save_model_dir
    from posttrain.train.dpo import run_dpo

    tok, model, rows = _setup(spec)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(model, tok, Path(tmp) / "model")
        data = Path(tmp) / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = build_config(
            DPOConfig,
            {
                "model": str(Path(tmp) / "model"),
                "data": str(data),
                "out": str(Path(tmp) / "run"),
                "loss": "dpo",
                "beta": 0.1,
                "batch_size": spec["batch_size"],
                "max_length": spec["max_length"],
                "length_policy": "truncate",
                "lr": 1e-6,
                "max_steps": spec["warmup"] + spec["steps"],
                "log_every": 1,
                # The pairs are a plain file, so there are no held-out rows: no end-of-run evaluation.
                "eval_every": 0,
                "progress": False,
                "threads": spec["threads"],
                "seed": 0,
            },
            path="dpo",
        )
        meter = LoadMeter().start()
        run_dpo(cfg)
        load = meter.stop()
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    # One record per step (log_every=1); step_s covers the stage's step and the scheduler step only.
    records = [r for r in map(json.loads, lines) if "step_s" in r]
    steps = [r["step_s"] for r in records]
    return {
        "step_s": statistics.median(steps[spec["warmup"] :]),
        "all_step_s": steps,
        "first_loss": records[0]["loss"],
        "params": params,
        "pair_tokens": _pair_tokens(tok, rows, spec["max_length"]),
        "peak_rss_mib": peak_rss_mib(),
        "threads_used": torch.get_num_threads(),
        **load,
    }


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    datasets.disable_progress_bars()
    tok, model, rows = _setup(spec)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        args = TRLDPOConfig(
            output_dir=tmp,
            max_steps=spec["warmup"] + spec["steps"],
            per_device_train_batch_size=spec["batch_size"],
            gradient_accumulation_steps=1,
            learning_rate=1e-6,
            lr_scheduler_type="cosine",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=0.1,
            loss_type=["sigmoid"],
            max_length=spec["max_length"],
            precompute_ref_log_probs=spec["side"] == "trl_precompute",
            bf16=False,
            fp16=False,
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
            dataloader_num_workers=0,
            use_cpu=True,
        )
        # The reference TRL would load from the policy's path: an identical frozen copy (built models have no path).
        ref = None if spec["side"] == "trl_precompute" else copy.deepcopy(model).eval()
        trainer = DPOTrainer(
            model=model,
            ref_model=ref,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tok,
        )
        ends: list[float] = []

        class StepClock(TrainerCallback):
            def on_step_end(self, *a: Any, **k: Any) -> None:
                ends.append(time.perf_counter())

        trainer.add_callback(StepClock())
        meter = LoadMeter().start()
        trainer.train()
        load = meter.stop()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = [b - a for a, b in zip(ends[:-1], ends[1:])]
    return {
        "step_s": statistics.median(steps[max(spec["warmup"] - 1, 0) :]),
        "all_step_s": [round(s, 4) for s in steps],
        "first_loss": losses[0] if losses else None,
        "params": params,
        "pair_tokens": _pair_tokens(tok, rows, spec["max_length"]),
        "peak_rss_mib": peak_rss_mib(),
        "threads_used": torch.get_num_threads(),
        **load,
    }


def run_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    meter = LoadMeter().start()
    return {"peak_flops": matmul_peak_flops(threads=spec["threads"]), **meter.stop()}


WORKERS = {"ours": run_ours, "trl": run_trl, "trl_precompute": run_trl, "matmul": run_matmul}
LABELS = {
    "ours": "posttrain dpo (reference precomputed)",
    "trl": "TRL DPOTrainer (default: reference forward each step)",
    "trl_precompute": "TRL DPOTrainer (precompute_ref_log_probs=True)",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["small", "tiny"], default="small")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimiser step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--skip-trl", action="store_true", help="time ours only (no TRL installed)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(RESULT_TAG + json.dumps(WORKERS[spec["side"]](spec)), flush=True)
        return
    base = {k: getattr(args, k) for k in ("model", "batch_size", "max_length", "steps", "warmup", "threads")}
    sides = ["matmul", "ours"] + ([] if args.skip_trl else ["trl", "trl_precompute"])
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    started = datetime.datetime.now(datetime.timezone.utc)
    for repeat in range(args.repeats):
        for side in sides[repeat % len(sides) :] + sides[: repeat % len(sides)]:
            r = machine_run_worker(__file__, {**base, "side": side}, args.timeout)
            runs[side].append(r)
            what = f"{r['peak_flops'] / 1e9:.1f} GFLOP/s" if side == "matmul" else f"step {r['step_s']:.3f} s"
            print(f"  repeat {repeat + 1} {side}: {what}", flush=True)
    peak = statistics.median(r["peak_flops"] for r in runs["matmul"])
    info = machine_info(args.threads)
    med = {s: statistics.median(r["step_s"] for r in runs[s]) for s in sides if s != "matmul"}
    lines = [
        f"## DPO step: posttrain vs TRL DPOTrainer ({started:%Y-%m-%d %H:%M} UTC)",
        "",
        f"Command: `{' '.join(['python benchmarks/bench_dpo.py', *sys.argv[1:]])}`",
        "",
        f"Machine: {info.get('cpu', '?')}, {args.threads} threads; torch {info.get('torch', '?')}, transformers "
        f"{info.get('transformers', '?')}, trl {info.get('trl', '?')}. Model: {args.model} (random init, fp32), "
        f"{args.batch_size} pairs per step, max length {args.max_length}, DPO (sigmoid) loss, beta 0.1. Medians of "
        f"{args.repeats} interleaved runs x {args.steps} timed steps. fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s.",
        "",
        "| | step s | pairs/s | MFU (6N per token) | peak RSS MiB | first loss |",
        "|---|---|---|---|---|---|",
    ]
    for side, label in LABELS.items():
        if side not in runs:
            continue
        r0 = runs[side][0]
        tokens = r0["pair_tokens"] * args.batch_size
        mfu = 6 * r0["params"] * tokens / med[side] / peak
        rss = statistics.median(r["peak_rss_mib"] for r in runs[side])
        lines.append(
            f"| {label} | {med[side]:.3f} | {args.batch_size / med[side]:.1f} | {100 * mfu:.1f}% | {rss:,.0f} | "
            f"{r0['first_loss']:.4f} |"
        )
    ratios = (
        ""
        if args.skip_trl
        else f"Ratios (TRL step time / ours): default **{med['trl'] / med['ours']:.2f}x**, precomputed reference "
        f"**{med['trl_precompute'] / med['ours']:.2f}x**. "
    )
    lines += ["", f"{ratios}Mean real tokens per pair: {runs['ours'][0]['pair_tokens']:.0f}."]
    print("\n".join(lines))
    if not args.no_write:
        with open(args.out, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
