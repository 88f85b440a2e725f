"""Weight-only quantization on a CPU: size on disk, load time, memory, prefill latency, decode speed and quality
of one model in float32, bfloat16, int8 (torchao) and int4 (bitsandbytes NF4), all made by ``posttrain``.

Each variant is measured in a fresh process (its own peak memory, no warm caches from another variant), one
after another with nothing else running: prefill = one no-grad forward of a batch of 1 x 128 tokens (median of
``--repeats`` after a warm-up); decode = ``posttrain``'s generation engine, greedy, ``--new-tokens`` tokens for
1 and for 8 prompts (tokens/s, median of ``--repeats`` after a warm-up); quality = perplexity on the shipped
English text (``text:general``). Memory: resident memory the model added (measured after the prefill forwards,
so every weight has been read) and the process's peak before the perplexity pass (which holds a batch of
full-vocabulary logits). Prints a markdown table, appended to ``--out``.

    OMP_NUM_THREADS=2 python benchmarks/bench_quantize.py --threads 2 --out BENCHMARKS.md
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# variant -> (quantize method or None, dtype of the unquantized weights and activations)
VARIANTS = {
    "float32": (None, "float32"),
    "bfloat16": (None, "bfloat16"),
    "int8": ("int8", "float32"),
    "int8, bf16 activations": ("int8", "bfloat16"),
    "int4 (nf4)": ("int4", "float32"),
    "int4 (nf4), bf16 activations": ("int4", "bfloat16"),
}


def prepare(model: str, work: Path) -> dict[str, str]:
    """The variants' model directories: the original (float32), a bfloat16 copy, and the quantized ones."""
    from posttrain.models.loading import load_model, resolve, save_model_dir
    from posttrain.toolbox.quantize import quantize_model

    dirs = {}
    for i, (name, (method, dtype)) in enumerate(VARIANTS.items()):
        out = work / f"v{i}"
        if method is None and dtype == "float32":
            dirs[name] = resolve(model)
        elif method is None:
            weights, tokenizer = load_model(model, dtype=dtype)
            save_model_dir(weights, tokenizer, out)
            dirs[name] = str(out)
        else:
            quantize_model(model, out, method=method, dtype=dtype)
            dirs[name] = str(out)
    return dirs


def memory_mb(field: str) -> float:
    """This process's resident memory now (``VmRSS``) or at its peak (``VmHWM``). Not ``ru_maxrss``: Linux carries
    that over from the parent across fork and exec, so a worker would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(path: str, *, dtype: str, threads: int, repeats: int, new_tokens: int) -> dict:
    """One variant, in this process: the figures of one table row."""
    import torch

    from posttrain.eval.harness import perplexity
    from posttrain.models.loading import load_model, parameter_count, weights_on_disk
    from posttrain.rollout.engine import HFEngine, SamplingParams

    torch.set_num_threads(threads)
    before = memory_mb("VmRSS")
    start = time.perf_counter()
    model, tokenizer = load_model(path, dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - start
    ids = torch.randint(3, min(len(tokenizer), 10000), (1, 128), generator=torch.Generator().manual_seed(0))
    prefill = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t = time.perf_counter()
            model(ids)
            if i:
                prefill.append(time.perf_counter() - t)
    loaded_mb = memory_mb("VmRSS") - before  # after forwards: every weight has been read (mapped files included)
    engine = HFEngine(model, tokenizer)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about the history of the city you like best."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    decode = {}
    for batch in (1, 8):
        rates = []
        for i in range(repeats + 1):
            t = time.perf_counter()
            out = engine.generate([prompt] * batch, params, seed=0)
            if i:
                rates.append(int(out.lengths.sum()) / (time.perf_counter() - t))
        decode[batch] = statistics.median(rates)
    peak_mb = memory_mb("VmHWM")
    ppl = perplexity(model, tokenizer, "text:general", max_length=256)
    return {
        "size_mb": weights_on_disk(path) / 2**20,
        "params": parameter_count(model),
        "load_s": load_s,
        "loaded_mb": loaded_mb,
        "peak_rss_mb": peak_mb,
        "prefill_ms": 1000 * statistics.median(prefill),
        "decode_tok_s_1": decode[1],
        "decode_tok_s_8": decode[8],
        "ppl_text_general": ppl,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", help="append the markdown section to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(
            json.dumps(
                measure(
                    args.worker,
                    dtype=args.dtype,
                    threads=args.threads,
                    repeats=args.repeats,
                    new_tokens=args.new_tokens,
                )
            )
        )
        return

    from benchmarks.machine import machine_info, package_version

    with tempfile.TemporaryDirectory() as tmp:
        dirs = prepare(args.model, Path(tmp))
        rows = {}
        for name, (_, dtype) in VARIANTS.items():
            argv = [sys.executable, __file__, "--worker", dirs[name], "--dtype", dtype, "--threads", str(args.threads)]
            argv += ["--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            done = subprocess.run(argv, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(name, rows[name], file=sys.stderr)
    info = machine_info(args.threads)
    info.update(torchao=package_version("torchao"), bitsandbytes=package_version("bitsandbytes"))
    base = rows["float32"]
    lines = [
        f"## Weight-only quantization on the CPU: {args.model} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        f"Command: `OMP_NUM_THREADS={args.threads} python benchmarks/bench_quantize.py --threads {args.threads}"
        f" --repeats {args.repeats} --new-tokens {args.new_tokens}`; each variant in a fresh process, one at a time.",
        "",
        "| variant | size on disk MB | params | load s | model RSS MB | peak RSS MB | prefill 1x128 ms |"
        " decode tok/s (1) |"
        " decode tok/s (8) | ppl text:general |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['size_mb']:.1f} ({r['size_mb'] / base['size_mb']:.2f}x) | {r['params'] / 1e6:.1f} M |"
            f" {r['load_s']:.1f} | {r['loaded_mb']:.0f} | {r['peak_rss_mb']:.0f}"
            f" | {r['prefill_ms']:.0f} ({r['prefill_ms'] / base['prefill_ms']:.2f}x)"
            f" | {r['decode_tok_s_1']:.1f} ({r['decode_tok_s_1'] / base['decode_tok_s_1']:.2f}x)"
            f" | {r['decode_tok_s_8']:.1f} ({r['decode_tok_s_8'] / base['decode_tok_s_8']:.2f}x)"
            f" | {r['ppl_text_general']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
