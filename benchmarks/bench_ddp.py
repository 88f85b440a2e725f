"""Scale-out on this machine: the same SFT job in 1 process (all threads) and under torchrun with 2 processes
(DDP, FSDP2), one thread each, same global batch. Reports the median step time, tokens/s, MFU against the fp32
matmul peak measured in the same run with the same total thread count, and how far the 2-process weights are
from the 1-process ones. On a 2-core CPU this measures the cost of the distributed machinery (gloo
all-reduce, FSDP2 gathers), not a speed-up: both set-ups use the same two cores.

    python benchmarks/bench_ddp.py                 # small model (25 M), 3 interleaved repetitions
    python benchmarks/bench_ddp.py --model builtin:tiny --steps 6 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, matmul_peak_flops  # noqa: E402

SETUPS = {"1 process x 2 threads": [], "DDP 2 x 1 thread": ["ddp"], "FSDP2 2 x 1 thread": ["fsdp"]}


def run_setup(name: str, args: argparse.Namespace, out: Path) -> dict:
    """One training run; returns its per-step times and tokens (from metrics.jsonl) and the wall time."""
    flags = [
        "sft", "--model", args.model, "--data", "task:arithmetic", "--max-length", "128",
        "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--lr", "1e-4", "--log-every", "1",
        "--no-progress", "--out", str(out), "--eval-data", "corpus:val", "--seed", "0",
    ]  # fmt: skip
    env = {**os.environ}
    if SETUPS[name]:
        env["OMP_NUM_THREADS"] = "1"
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        flags += ["--threads", "1"] + (["--fsdp"] if SETUPS[name] == ["fsdp"] else [])
    else:
        head = [sys.executable]
        flags += ["--threads", "2"]
    started = time.perf_counter()
    result = subprocess.run([*head, "-m", "posttrain", *flags], capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_s" in r]
    return {
        "step_s": [r["step_s"] for r in steps[args.warmup :]],
        "tokens": [r["tokens_per_s"] * r["step_s"] for r in steps[args.warmup :]],
        "wall_s": time.perf_counter() - started,
        "summary": json.loads((out / "summary.json").read_text()),
    }


def max_weight_gap(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", default=str(Path(__file__).resolve().parent.parent / "BENCHMARKS.md"))
    args = parser.parse_args()
    peak = matmul_peak_flops(threads=2)
    times: dict[str, list[float]] = {n: [] for n in SETUPS}
    tokens: dict[str, list[float]] = {n: [] for n in SETUPS}
    gaps: dict[str, float] = {}
    params = 0
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):  # interleaved, so slow drifts of the machine hit every set-up alike
            for name in SETUPS:
                out = Path(tmp) / f"{rep}-{SETUPS[name] or ['one']}"
                r = run_setup(name, args, out)
                times[name] += r["step_s"]
                tokens[name] += r["tokens"]
                params = r["summary"]["parameters"]
                if SETUPS[name] and rep == 0:
                    gaps[name] = max_weight_gap(Path(tmp) / "0-['one']", out)
    rows = []
    base = statistics.median(times["1 process x 2 threads"])
    for name in SETUPS:
        step = statistics.median(times[name])
        tok_s = statistics.median(tokens[name]) / step
        mfu = 6 * params * tok_s / peak
        gap = f"{gaps[name]:.1e}" if name in gaps else "-"
        rows.append(f"| {name} | {step:.3f} | {tok_s:,.0f} | {100 * mfu:.1f}% | {base / step:.2f}x | {gap} |")
    info = machine_info(2)
    lines = [
        "",
        f"## Scale-out on one machine: SFT, 1 process vs torchrun DDP / FSDP2 ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",  # noqa: E501
        "",
        f"Machine: {info['cpu']} ({info['cores']} cores), torch {torch.__version__}; model `{args.model}`"
        f" ({params / 1e6:.1f} M parameters, fp32), SFT on `task:arithmetic`, global batch {args.batch_size},"
        f" max length 128, {args.steps} steps of which the first {args.warmup} are not timed, {args.repeats}"
        f" interleaved repetitions, medians. fp32 matmul peak (2 threads, measured in this run):"
        f" {peak / 1e9:.1f} GFLOP/s. Both set-ups use the same 2 cores, so the ratio is the cost of the"
        " distributed machinery here (gloo all-reduce, FSDP2 gathers), not a speed-up. Weight gap: largest"
        " |w_2proc - w_1proc| after the run.",
        "",
        "| set-up | step (s) | tokens/s | MFU | vs 1 process | weight gap |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    print("\n".join(lines))
    with open(args.markdown, "a") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
