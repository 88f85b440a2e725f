"""The PEFT family on one model and one budget: trainable parameters, peak memory, s/step and held-out accuracy.

Each method trains ``posttrain sft`` in a fresh process (so each peak memory is its own) on the same rows,
batch, steps, seed and precision, at the learning rate usual for it (listed in the table), then ``posttrain
eval`` measures greedy accuracy on the first ``--eval-limit`` test problems of the task (strict: the toy's
"Answer: N" line; fair: the reply's final answer, see ``posttrain.tasks.answers``). The base model's own
accuracy is the first row. Results are printed as a markdown table and appended to ``--out``.

    OMP_NUM_THREADS=2 python benchmarks/bench_peft.py --threads 2 --steps 40 --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The usual learning rate of each method for a ~100M model (peft's and the papers' examples): adapters with few
# parameters take larger steps; full fine-tuning the smallest.
METHODS = {
    "none": 2e-5,
    "lora": 5e-4,
    "dora": 5e-4,
    "rslora": 2e-4,
    "ia3": 5e-3,
    "prompt": 3e-2,
    "prefix": 5e-3,
    "qlora": 5e-4,
}


def run(args: list[str], log: Path) -> float:
    """Run ``python -m posttrain ARGS`` (output to ``log``); its wall time in seconds; an error names the log."""
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run([sys.executable, "-m", "posttrain", *args], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"posttrain {' '.join(args[:1])} failed (log {log}):\n{tail}")
    return time.perf_counter() - start


def evaluate(model: str, work: Path, name: str, opts: argparse.Namespace) -> dict:
    out = work / f"{name}-eval.json"
    common = ["--threads", str(opts.threads), "--dtype", "float32", "--no-progress", "--overwrite"]
    run(
        [
            "eval",
            "--model",
            model,
            "--task",
            opts.task,
            "--limit",
            str(opts.eval_limit),
            "--max-new-tokens",
            "48",
            "--out",
            str(out),
            *common,
        ],
        work / f"{name}-eval.log",
    )
    return json.loads(out.read_text())


def accuracy(result: dict, key: str) -> str:
    value = result.get(key)
    return "n/a" if value is None else f"{100 * value:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated; none = full fine-tune")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--rank", type=int, default=8, help="LoRA-family rank")
    parser.add_argument("--virtual-tokens", type=int, default=16)
    parser.add_argument("--work", default="", help="keep runs here (default: a temp dir)")
    parser.add_argument("--out", default="", help="markdown file to append the table to")
    opts = parser.parse_args()
    work = Path(opts.work or tempfile.mkdtemp(prefix="bench_peft_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    base = evaluate(opts.model, work, "base", opts)
    rows.append(
        ["base (no training)", "0", "", "", "", accuracy(base, "accuracy_strict"), accuracy(base, "accuracy_fair")]
    )
    for method in opts.methods.split(","):
        lr = METHODS[method]
        out = work / method
        train = ["sft", "--model", opts.model, "--data", f"task:{opts.task}", "--out", str(out), "--overwrite"]
        train += ["--peft", method, "--max-steps", str(opts.steps), "--batch-size", str(opts.batch_size)]
        train += ["--max-length", str(opts.max_length), "--lr", str(lr), "--threads", str(opts.threads)]
        train += ["--no-progress", "--log-every", "10"]
        if method in ("lora", "dora", "rslora", "qlora"):
            train += ["--lora-rank", str(opts.rank)]
        if method in ("prompt", "prefix"):
            train += ["--virtual-tokens", str(opts.virtual_tokens)]
        if opts.precision == "bf16":
            train += ["--mixed-precision", "bf16"]
        run(train, work / f"{method}-train.log")
        summary = json.loads((out / "summary.json").read_text())
        result = evaluate(str(out / "final"), work, method, opts)
        rows.append(
            [
                "full fine-tune" if method == "none" else method,
                f"{summary['trainable_parameters']:,}",
                f"{lr:g}",
                f"{summary['peak_memory_mb']:,.0f}",
                f"{summary['train_wall_s'] / max(summary['steps'], 1):.2f}",
                accuracy(result, "accuracy_strict"),
                accuracy(result, "accuracy_fair"),
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    header = (
        f"## PEFT methods on {opts.model}: {opts.steps} SFT steps on task:{opts.task}"
        f" ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
        f"- Batch {opts.batch_size} rows, max length {opts.max_length}, {opts.precision}"
        f" ({'bf16 autocast, fp32 weights' if opts.precision == 'bf16' else 'fp32'}), {opts.threads} threads"
        f" (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), seed 0; LoRA-family rank {opts.rank},"
        f" prompt/prefix {opts.virtual_tokens} virtual tokens. Accuracy: greedy, first {opts.eval_limit} test"
        " problems, 48 new tokens, fp32 weights. Peak memory: the training process's peak RSS (summary.json)."
        " s/step: training steps only (no evaluation, loading or saving).\n\n"
        "| method | trainable parameters | lr | peak memory MiB | s/step | held-out strict | held-out fair |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    table = header + "".join("| " + " | ".join(r) + " |\n" for r in rows)
    table += f"\nCommand: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')} python benchmarks/bench_peft.py"
    table += f" {' '.join(sys.argv[1:])}`\n"
    print(table)
    if opts.out:
        with open(opts.out, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
