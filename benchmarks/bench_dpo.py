"""DPO speed: posttrain's ``dpo`` vs TRL's ``DPOTrainer`` on the same model, pairs, batch and lengths.

    python benchmarks/bench_dpo.py                        # small model, batch 8 pairs, max length 128, 3 repeats
    python benchmarks/bench_dpo.py --model tiny --steps 4 --repeats 1 --no-write
    python benchmarks/bench_dpo.py --model smollm2 --precision bf16 --steps 4 --warmup 1 --repeats 2
    python benchmarks/bench_dpo.py --model smollm2 --trl-modes precompute --floor    # one TRL mode; the floor

Both sides AdamW, lr 1e-6 cosine, clip 1.0, beta 0.1, sigmoid (DPO) loss, the generated arithmetic preference
pairs (``task:arithmetic_prefs``) truncated to 128 tokens, in fp32 or under bf16 autocast (``--precision bf16``:
ours ``mixed_precision: bf16``, TRL ``bf16=True``; weights and optimiser state fp32 on both). ``--model smollm2``
trains the real SmolLM2-135M-Instruct (its weights, BPE tokenizer and chat template) on both sides; there the
rows default to exactly the ``batch x (warmup + steps)`` pairs the run visits, so both sides train on the same
pairs and TRL's ``precompute_ref_log_probs`` pass covers no more rows than ours.

Timed: wall time of an optimiser step after the warm-up (ours: the training scaffold's ``step_s`` in
metrics.jsonl; TRL: between ``on_step_end`` callbacks). Not timed: model build, tokenisation, our one-off
reference pass over the visited rows (TRL's ``precompute_ref_log_probs`` pass likewise, when on), our end of run
(last checkpoint, ``final/`` model). TRL runs in its default mode (a reference model forward every step) and with
``precompute_ref_log_probs=True``. Tokens are the real (non-padding) tokens of the chosen and rejected sequences
each side's steps processed (counted per step: ours from the rows each step took, TRL from its collated
batches); tokens/s is the timed steps' tokens over their time. MFU counts 6N per trained token (the policy's
forward and backward) on both sides, against the matmul peak of the run's precision measured in the same rounds.
TRL is handed the pairs in the order our seeded sampler takes them (sequential sampling), so both sides train on
the same pairs in every step; both sides' token ids and loss masks of the first 64 pairs trained on, and their
real tokens per step, are compared and the result reported.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
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

from benchmarks.machine import (  # noqa: E402
    MODELS,
    PRECISIONS,
    RESULT_TAG,
    LoadMeter,
    emit_report,
    floor_lines,
    load_bench_model,
    machine_info,
    matmul_peak_flops,
    model_label,
    model_source,
    peak_dtype,
    peak_rss_mib,
    step_floor,
)
from benchmarks.machine import run_worker as machine_run_worker  # noqa: E402

FINGERPRINT_PAIRS = 64


def _setup(spec: dict[str, Any]) -> tuple[Any, Any, list[dict]]:
    import torch

    torch.set_num_threads(spec["threads"])
    from posttrain.tasks import get_task

    model, tok = load_bench_model(spec["model"], seed=0)
    rows = [
        {k: r[k] for k in ("prompt", "chosen", "rejected")}
        for r in get_task("arithmetic_prefs").rows("train", spec["rows"])
    ]
    return tok, model, rows


def step_order(spec: dict[str, Any], size: int) -> list[int]:
    """The row indices our DPO steps take, in order (the scaffold's seeded ``ResumableSampler``); TRL is handed the
    rows in this order with sequential sampling, so both sides train on the same pairs in every step."""
    from posttrain.data.batching import ResumableSampler

    sampler = ResumableSampler(size, seed=0)
    return [i for _ in range(spec["warmup"] + spec["steps"]) for i in sampler.take(spec["batch_size"])]


def _fingerprint(seqs: list[tuple[list[int], list[bool]]]) -> dict[str, Any]:
    """Hashes of the ids, and of (ids, trained-token mask), of the first pairs' chosen and rejected sequences."""
    digest = lambda obj: hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]  # noqa: E731
    return {
        "fingerprint": digest(seqs),
        "ids_fingerprint": digest([ids for ids, _ in seqs]),
        "trained_tokens": sum(sum(mask) for _, mask in seqs),
    }


def _timed(step_s: list[float], step_tokens: list[int], warmup: int) -> dict[str, Any]:
    times, tokens = step_s[warmup:], step_tokens[warmup : len(step_s)]
    if not times:
        raise SystemExit(f"no timed steps: {len(step_s)} steps ran, {warmup} are warm-up")
    return {
        "step_s": statistics.median(times),
        "tokens_per_step": statistics.mean(tokens),
        "tokens_per_s": sum(tokens) / sum(times),
        "all_step_s": [round(t, 4) for t in step_s],
        "all_step_tokens": step_tokens,
    }


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import posttrain.train.dpo as dpo
    from posttrain.config import DPOConfig, build_config

    tok, model, rows = _setup(spec)
    params = sum(p.numel() for p in model.parameters())
    step_tokens: list[int] = []
    real_step = dpo.DPOStage.step

    def counting_step(self: Any, run: Any, indices: list[int], step: int) -> dict[str, Any]:
        step_tokens.append(sum(len(e.input_ids) for i in indices for e in self.items[i]))
        return real_step(self, run, indices, step)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = build_config(
            DPOConfig,
            {
                "model": model_source(spec["model"], model, tok, Path(tmp) / "model"),
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
                "mixed_precision": "bf16" if spec["precision"] == "bf16" else "no",
                "seed": 0,
            },
            path="dpo",
        )
        visited = [rows[i] for i in step_order(spec, len(rows))]
        items, _, _ = dpo.encode_pairs(visited[:FINGERPRINT_PAIRS], tok, cfg)
        seqs = [(e.input_ids, e.loss_mask) for pair in items for e in pair]
        del model  # the stage loads its own copy from cfg.model
        dpo.DPOStage.step = counting_step
        try:
            meter = LoadMeter().start()
            dpo.run_dpo(cfg)
            load = meter.stop()
        finally:
            dpo.DPOStage.step = real_step
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    # One record per step (log_every=1); step_s covers the stage's step and the scheduler step only.
    records = [r for r in map(json.loads, lines) if "step_s" in r]
    return {
        **_timed([r["step_s"] for r in records], step_tokens, spec["warmup"]),
        **_fingerprint(seqs),
        "first_loss": records[0]["loss"],
        "params": params,
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
            bf16=spec["precision"] == "bf16",
            fp16=False,
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
            dataloader_num_workers=0,
            use_cpu=True,
            train_sampling_strategy="sequential",  # the rows come in our sampler's order
        )
        # The reference TRL would load from the policy's path: an identical frozen copy.
        ref = None if spec["side"] == "trl_precompute" else copy.deepcopy(model).eval()
        trainer = DPOTrainer(
            model=model,
            ref_model=ref,
            args=args,
            train_dataset=datasets.Dataset.from_list([rows[i] for i in step_order(spec, len(rows))]),
            processing_class=tok,
        )
        seqs = []
        for ex in trainer.train_dataset.select(range(min(FINGERPRINT_PAIRS, len(trainer.train_dataset)))):
            for key in ("chosen_ids", "rejected_ids"):
                ids = (ex["prompt_ids"] + ex[key])[: spec["max_length"]]
                mask = ([False] * len(ex["prompt_ids"]) + [True] * len(ex[key]))[: spec["max_length"]]
                seqs.append((ids, mask))
        step_tokens: list[int] = []  # real (non-padding) tokens of each collated batch, in order
        collate = trainer.data_collator

        def counting_collator(examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collate(examples)
            step_tokens.append(int(batch["attention_mask"].sum()))
            return batch

        trainer.data_collator = counting_collator
        ends: list[float] = []

        class StepClock(TrainerCallback):
            def on_train_begin(self, *a: Any, **k: Any) -> None:
                ends.append(time.perf_counter())

            def on_step_end(self, *a: Any, **k: Any) -> None:
                ends.append(time.perf_counter())

        trainer.add_callback(StepClock())
        meter = LoadMeter().start()
        trainer.train()
        load = meter.stop()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        **_timed([b - a for a, b in zip(ends[:-1], ends[1:])], step_tokens, spec["warmup"]),
        **_fingerprint(seqs),
        "first_loss": losses[0] if losses else None,
        "params": params,
        "peak_rss_mib": peak_rss_mib(),
        "threads_used": torch.get_num_threads(),
        **load,
    }


def run_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    meter = LoadMeter().start()
    return {
        "peak_flops": matmul_peak_flops(threads=spec["threads"], dtype=peak_dtype(spec["precision"])),
        **meter.stop(),
    }


def run_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """The measured floor of one step (``benchmarks.machine.step_floor``) at our median tokens per step."""
    model, _ = load_bench_model(spec["model"], seed=0)
    return step_floor(model, tokens=spec["tokens"], precision=spec["precision"], threads=spec["threads"])


WORKERS = {"ours": run_ours, "trl": run_trl, "trl_precompute": run_trl, "matmul": run_matmul, "floor": run_floor}
LABELS = {
    "ours": "posttrain dpo (reference precomputed)",
    "trl": "TRL DPOTrainer (default: reference forward each step)",
    "trl_precompute": "TRL DPOTrainer (precompute_ref_log_probs=True)",
}
TRL_MODES = {"default": "trl", "precompute": "trl_precompute"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", choices=MODELS, default="small", help="small/tiny: random init; smollm2: SmolLM2-135M-Instruct"
    )
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32, or bf16 autocast on both sides")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimiser step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (interleaved)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--rows",
        type=int,
        help="preference pairs in the data (default: 512; smollm2: batch x (warmup + steps), the pairs visited)",
    )
    p.add_argument(
        "--trl-modes",
        default="default,precompute",
        help="TRL configurations to time: default (reference forward each step), precompute, or both",
    )
    p.add_argument(
        "--wait-quiet", type=float, default=0, help="before each run, wait up to this many s for a quiet machine"
    )
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--json", help="also write every run's raw results to this JSON file")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--skip-trl", action="store_true", help="time ours only (no TRL installed)")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also measure the step's floor: its matmuls at the model's shapes and the optimiser step (one run)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def same_tokens(ours: dict[str, Any], trl: dict[str, Any]) -> str:
    if ours["fingerprint"] == trl["fingerprint"]:
        return "yes"
    if ours["ids_fingerprint"] != trl["ids_fingerprint"]:
        return "**NO** (different token ids)"
    return (
        f"same ids; loss masks differ: {ours['trained_tokens']} trained tokens (ours) vs {trl['trained_tokens']} (TRL)"
    )


def same_steps(ours: dict[str, Any], trl: dict[str, Any]) -> str:
    n = min(len(ours["all_step_s"]), len(trl["all_step_s"]))
    return "yes" if ours["all_step_tokens"][:n] == trl["all_step_tokens"][:n] else "**no**"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(RESULT_TAG + json.dumps(WORKERS[spec["side"]](spec)), flush=True)
        return
    rows = args.rows or (args.batch_size * (args.warmup + args.steps) if args.model == "smollm2" else 512)
    keys = ("model", "precision", "batch_size", "max_length", "steps", "warmup", "threads")
    base = {**{k: getattr(args, k) for k in keys}, "rows": rows}
    modes = [] if args.skip_trl else [TRL_MODES[m.strip()] for m in args.trl_modes.split(",") if m.strip()]
    sides = ["matmul", "ours", *modes]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    started, t0 = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    for repeat in range(args.repeats):
        for side in sides[repeat % len(sides) :] + sides[: repeat % len(sides)]:
            r = machine_run_worker(__file__, {**base, "side": side}, args.timeout, wait_quiet=args.wait_quiet)
            runs[side].append(r)
            what = (
                f"{r['peak_flops'] / 1e9:.1f} GFLOP/s"
                if side == "matmul"
                else f"step {r['step_s']:.3f} s, {r['tokens_per_s']:,.0f} tokens/s"
            )
            print(
                f"  repeat {repeat + 1} {side}: {what} (other processes {r['other_cores'] or 0:.2f} cores)", flush=True
            )
    floor = None
    if args.floor:
        tokens = round(statistics.mean(r["tokens_per_step"] for r in runs["ours"]))
        floor = machine_run_worker(
            __file__, {**base, "side": "floor", "tokens": tokens}, args.timeout, wait_quiet=args.wait_quiet
        )
    lines = report(runs, args, rows, started, machine_info(args.threads), floor)
    emit_report(lines, args, {"runs": runs, "rows": rows})
    print(f"(benchmark wall time {time.perf_counter() - t0:.0f} s)")


def report(
    runs: dict[str, list[dict[str, Any]]],
    args: argparse.Namespace,
    rows: int,
    started: Any,
    info: dict[str, str],
    floor: dict[str, float] | None = None,
) -> list[str]:
    """Markdown section: one row per side (step time, tokens/s, MFU, peak RSS, load), ratios, token check."""
    peak = statistics.median(r["peak_flops"] for r in runs["matmul"])
    sides = [s for s in LABELS if s in runs]
    med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in ("step_s", "tokens_per_s")} for s in sides}
    precision = (
        "bf16 autocast on both sides (ours `mixed_precision: bf16`, TRL `bf16=True`; weights and optimiser fp32)"
        if args.precision == "bf16"
        else "fp32 on both sides"
    )
    others_all = [r["other_cores"] for s in sides for r in runs[s] if r["other_cores"] is not None]
    lines = [
        f"## DPO step: posttrain vs TRL DPOTrainer, {args.model}, {args.precision} ({started:%Y-%m-%d %H:%M} UTC)",
        "",
        f"Command: `{' '.join(['python benchmarks/bench_dpo.py', *sys.argv[1:]])}`",
        "",
        f"Machine: {info.get('cpu', '?')}, {args.threads} threads; torch {info.get('torch', '?')}, transformers "
        f"{info.get('transformers', '?')}, trl {info.get('trl', '?')}. Model: {model_label(args.model)}, "
        f"{runs['ours'][0]['params']:,} parameters. Precision: {precision}. {args.batch_size} pairs per step from "
        f"{rows} pairs, max length {args.max_length}, DPO (sigmoid) loss, beta 0.1. Medians of {args.repeats} "
        f"interleaved runs x {args.steps} timed steps (after {args.warmup} warm-up). {args.precision} matmul peak "
        f"(2048 {peak_dtype(args.precision)} GEMM, same rounds), the MFU denominator: {peak / 1e9:.1f} GFLOP/s. "
        "Background load: "
        + (
            f"other processes used median {statistics.median(others_all):.2f}, max {max(others_all):.2f} cores."
            if others_all
            else "unknown."
        ),
        "",
        "| | step s | tokens/step | tokens/s | pairs/s | MFU (6N per token) | peak RSS MiB | first loss | other cores"
        " |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for side in sides:
        rs, step, tps = runs[side], med[side]["step_s"], med[side]["tokens_per_s"]
        mfu = 6 * rs[0]["params"] * tps / peak
        rss = statistics.median(r["peak_rss_mib"] for r in rs)
        others = [r["other_cores"] for r in rs if r["other_cores"] is not None]
        load = f"{max(others):.2f}" if others else "n/a"
        lines.append(
            f"| {LABELS[side]} | {step:.3f} | {statistics.mean(r['tokens_per_step'] for r in rs):,.0f} | {tps:,.0f} |"
            f" {args.batch_size / step:.2f} | {100 * mfu:.1f}% | {rss:,.0f} | {rs[0]['first_loss']:.4f} | {load} |"
        )
    lines.append("")
    for side in sides[1:]:
        ratio = med["ours"]["tokens_per_s"] / med[side]["tokens_per_s"]
        lines.append(
            f"- Ours / {LABELS[side]}: **{ratio:.2f}x** tokens/s ({med[side]['step_s'] / med['ours']['step_s']:.2f}x in"
            f" step time); same token ids and loss masks (first {min(FINGERPRINT_PAIRS, rows)} pairs trained on):"
            f" {same_tokens(runs['ours'][0], runs[side][0])}; same pairs in every step (real tokens per step"
            f" equal): {same_steps(runs['ours'][0], runs[side][0])}."
        )
        if args.model == "smollm2" and args.precision == "bf16":
            lines.append(f"- Target ours >= 1.5x TRL tokens/s (bf16): **{'met' if ratio >= 1.5 else 'NOT met'}**.")
    if args.model == "smollm2" and args.precision == "fp32":
        mfu = 6 * runs["ours"][0]["params"] * med["ours"]["tokens_per_s"] / peak
        lines.append(
            f"- Target MFU >= 75% of the fp32 matmul peak (ours): **{'met' if mfu >= 0.75 else 'NOT met'}**"
            f" ({100 * mfu:.1f}%)."
        )
    if floor:
        lines += floor_lines(floor, peak, args.precision)
    return lines


if __name__ == "__main__":
    main()
