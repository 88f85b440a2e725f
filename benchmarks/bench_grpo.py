"""GRPO speed: posttrain's trainer vs TRL's ``GRPOTrainer``, and our rollout engine vs ``model.generate``.

    python benchmarks/bench_grpo.py                       # small model, 2 warm-up + 8 timed steps, 3 repeats
    python benchmarks/bench_grpo.py --model tiny --steps 3 --repeats 1 --no-write    # a quick check

The work (the issue's standard setting): the standard small model (random init, fp32), one prompt per step,
G = 8 completions of exactly 64 new tokens (EOS is not sampled before 64 tokens on either side: ``min_new_tokens``),
temperature 1, no KL term (so no reference model), one policy update per rollout batch, the same reward (the
share of digits in the completion, so groups have varied rewards), the same prompts in the same order, the same
learning rate and loss normalisation (DAPO token mean).

What is timed:
- GRPO step: wall time of one whole optimiser step (generation, reward, advantages, forward/backward, optimiser
  step). Ours: the training scaffold's own ``step_s`` (metrics.jsonl; the end-of-run checkpoint and ``final/``
  save are outside every step); TRL: between ``on_step_end`` callbacks (its per-step logging inside). The phase split
  (generate / reward / update = the rest) comes from the trainers' own timers (ours) or wrapped methods (TRL's
  ``_generate`` and ``_calculate_rewards``).
- Rollout: tokens/s of 1 prompt x 8 samples x 64 new tokens: ``HFEngine.generate`` (prefill once, KV cache
  repeated 8 times) vs ``model.generate(..., do_sample=True, num_return_sequences=8)``.

MFU counts the same model FLOPs for both sides: 2N per generated token and per prompt token of one prefill,
plus 6N per token of the 8 prompt+completion sequences trained on; the fp32 matmul peak is measured in the same
rounds. Every configuration and repeat runs in its own subprocess, interleaved; medians are reported.
"""

from __future__ import annotations

import argparse
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


def digit_share(completion: str, **_: Any) -> float:
    """The benchmark reward (posttrain's API): share of digit characters in the completion."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def digit_share_trl(prompts: list, completions: list, **_: Any) -> list[float]:
    """The same reward in TRL's API (conversational completions are lists of messages)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [digit_share(t) for t in texts]


# --------------------------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON result line.
# --------------------------------------------------------------------------------------------------------------


def _setup(spec: dict[str, Any]) -> tuple[Any, Any, list[dict]]:
    import torch

    torch.set_num_threads(spec["threads"])
    from posttrain.models.tiny import build_model, build_tokenizer
    from posttrain.tasks import get_task

    tok = build_tokenizer()
    model = build_model(tok, size=spec["model"], seed=0)
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in get_task("arithmetic").rows("train", 64)]
    return tok, model, rows


def _prompt_tokens(tok: Any, rows: list[dict]) -> float:
    prompts = _generation_prompts(tok, rows, 8)
    return statistics.mean(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)


def _flops(spec: dict[str, Any], params: int, prompt_tokens: float) -> float:
    """Model FLOPs of one step (see the module docstring); identical for both sides."""
    g, t = spec["group_size"], spec["new_tokens"]
    return 2 * params * (prompt_tokens + g * t) + 6 * params * g * (prompt_tokens + t)


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from posttrain.config import GRPOConfig, build_config
    from posttrain.models.loading import save_model_dir
    from posttrain.train.grpo import run_grpo

    tok, model, rows = _setup(spec)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(model, tok, Path(tmp) / "model")
        data = Path(tmp) / "prompts.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = build_config(
            GRPOConfig,
            {
                "model": str(Path(tmp) / "model"),
                "data": str(data),
                "out": str(Path(tmp) / "run"),
                "reward": ["benchmarks.bench_grpo:digit_share"],
                "group_size": spec["group_size"],
                "batch_prompts": 1,
                "max_new_tokens": spec["new_tokens"],
                "min_new_tokens": spec["new_tokens"],
                "temperature": 1.0,
                "rollout_dtype": "bfloat16" if spec["precision"] == "bf16" else "auto",
                "mixed_precision": spec["precision"] if spec["precision"] == "bf16" else "no",
                "loss": "dapo",
                "kl_coef": 0.0,
                "lr": spec["lr"],
                "max_steps": spec["warmup"] + spec["steps"],
                "log_every": 1,
                # The prompts are a plain file, so there are no held-out rows: no end-of-run greedy evaluation.
                "eval_every": 0,
                "progress": False,
                "threads": spec["threads"],
                "seed": 0,
            },
            path="grpo",
        )
        meter = LoadMeter().start()
        run_grpo(cfg)
        load = meter.stop()
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    # One record per step (log_every=1); step_s is the scaffold's clock around the stage's step (generation,
    # reward, update, engine refresh) and the scheduler step. The end of run (checkpoint, final/) is outside it.
    records = [r for r in map(json.loads, lines) if "step_s" in r]
    timed = records[spec["warmup"] :]
    prompt_tokens = _prompt_tokens(tok, rows)
    return {
        "step_s": statistics.median(r["step_s"] for r in timed),
        "generate_s": statistics.median(r["generate_s"] for r in timed),
        "reward_s": statistics.median(r["reward_s"] for r in timed),
        "update_s": statistics.median(r["update_s"] + r.get("reference_s", 0.0) for r in timed),
        "completion_tokens": statistics.mean(r["completion_length"] for r in timed) * spec["group_size"],
        "all_step_s": [r["step_s"] for r in records],
        "reward_mean": [round(r["reward_mean"], 4) for r in records],
        "params": params,
        "prompt_tokens": prompt_tokens,
        "flops_per_step": _flops(spec, params, prompt_tokens),
        "peak_rss_mib": peak_rss_mib(),
        "threads_used": torch.get_num_threads(),
        **load,
    }


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    datasets.disable_progress_bars()
    tok, model, rows = _setup(spec)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        args = TRLGRPOConfig(
            output_dir=tmp,
            max_steps=spec["warmup"] + spec["steps"],
            per_device_train_batch_size=spec["group_size"],
            num_generations=spec["group_size"],
            gradient_accumulation_steps=1,
            max_completion_length=spec["new_tokens"],
            generation_kwargs={"min_new_tokens": spec["new_tokens"]},
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=0.0,
            num_iterations=1,
            loss_type="dapo",
            learning_rate=spec["lr"],
            lr_scheduler_type="cosine",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            bf16=spec["precision"] == "bf16",
            fp16=False,
            gradient_checkpointing=False,
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
            dataloader_num_workers=0,
            use_cpu=True,
            shuffle_dataset=False,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[digit_share_trl],
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tok,
        )
        phases: dict[str, list[float]] = {"generate_s": [], "reward_s": []}

        def timed(name: str, fn: Any) -> Any:
            def wrapper(*a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    phases[name].append(time.perf_counter() - t)

            return wrapper

        trainer._generate = timed("generate_s", trainer._generate)
        trainer._calculate_rewards = timed("reward_s", trainer._calculate_rewards)
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
        history = [h for h in trainer.state.log_history if "reward" in h]
    steps = [b - a for a, b in zip(ends[:-1], ends[1:])]
    w = spec["warmup"]
    gen, rew = phases["generate_s"][w : len(steps)], phases["reward_s"][w : len(steps)]
    update = [s - g - r for s, g, r in zip(steps[w:], gen, rew)]
    prompt_tokens = _prompt_tokens(tok, rows)
    return {
        "step_s": statistics.median(steps[w:]),
        "generate_s": statistics.median(gen),
        "reward_s": statistics.median(rew),
        "update_s": statistics.median(update),
        "completion_tokens": statistics.mean(h.get("completions/mean_length", 0) for h in history[w:])
        * spec["group_size"],
        "all_step_s": [round(s, 4) for s in steps],
        "reward_mean": [round(h["reward"], 4) for h in history],
        "params": params,
        "prompt_tokens": prompt_tokens,
        "flops_per_step": _flops(spec, params, prompt_tokens),
        "peak_rss_mib": peak_rss_mib(),
        "threads_used": torch.get_num_threads(),
        **load,
    }


def _generation_prompts(tok: Any, rows: list[dict], n: int) -> list[str]:
    return [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows[:n]]


def run_gen_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from posttrain.rollout import HFEngine, SamplingParams

    tok, model, rows = _setup(spec)
    model = model.to(torch.bfloat16) if spec["precision"] == "bf16" else model
    engine = HFEngine(model.eval(), tok)
    g, t = spec["group_size"], spec["new_tokens"]
    params = SamplingParams(n=g, temperature=1.0, max_new_tokens=t, min_new_tokens=t)
    times, tokens = [], []
    meter = LoadMeter().start()
    for i, prompt in enumerate(_generation_prompts(tok, rows, spec["warmup"] + spec["steps"])):
        start = time.perf_counter()
        out = engine.generate([prompt], params, seed=i)
        times.append(time.perf_counter() - start)
        tokens.append(int(out.mask.sum()))
    load = meter.stop()
    w = spec["warmup"]
    return {
        "call_s": statistics.median(times[w:]),
        "tokens_per_call": statistics.mean(tokens[w:]),
        "tokens_per_s": sum(tokens[w:]) / sum(times[w:]),
        "threads_used": torch.get_num_threads(),
        **load,
    }


def run_gen_hf(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    tok, model, rows = _setup(spec)
    model = model.to(torch.bfloat16) if spec["precision"] == "bf16" else model
    model.eval()
    g, t = spec["group_size"], spec["new_tokens"]
    times, tokens = [], []
    meter = LoadMeter().start()
    for i, prompt in enumerate(_generation_prompts(tok, rows, spec["warmup"] + spec["steps"])):
        enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
        torch.manual_seed(i)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=g,
                max_new_tokens=t,
                min_new_tokens=t,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        times.append(time.perf_counter() - start)
        new = out[:, enc["input_ids"].shape[1] :]
        tokens.append(int(new.numel()))
    load = meter.stop()
    w = spec["warmup"]
    return {
        "call_s": statistics.median(times[w:]),
        "tokens_per_call": statistics.mean(tokens[w:]),
        "tokens_per_s": sum(tokens[w:]) / sum(times[w:]),
        "threads_used": torch.get_num_threads(),
        **load,
    }


def run_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    meter = LoadMeter().start()
    dtype = "bfloat16" if spec["precision"] == "bf16" else "float32"
    flops = matmul_peak_flops(threads=spec["threads"], size=2048, repeats=10, dtype=dtype)
    return {"peak_flops": flops, **meter.stop()}


WORKERS = {"ours": run_ours, "trl": run_trl, "gen_ours": run_gen_ours, "gen_hf": run_gen_hf, "matmul": run_matmul}


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------


def run_worker(spec: dict[str, Any], timeout: float, *, wait_quiet: float = 0) -> dict[str, Any]:
    """One configuration in a fresh process (see ``benchmarks.machine.run_worker``)."""
    return machine_run_worker(__file__, spec, timeout, wait_quiet=wait_quiet)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=["small", "tiny"], default="small", help="standard benchmark model size")
    p.add_argument("--steps", type=int, default=8, help="timed steps (and generate calls) per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (interleaved)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per completion (exactly)")
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate (both sides)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="fp32 everywhere, or each side's bf16 mode (TRL: bf16=True, autocast; ours: bf16 rollouts + autocast)",
    )
    p.add_argument("--skip-trl", action="store_true", help="time ours only")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a worker is killed")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="markdown file to append to")
    p.add_argument("--json", help="also write every run's raw results and the summary to this JSON file")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to --out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(RESULT_TAG + json.dumps(WORKERS[spec["side"]](spec)), flush=True)
        return
    base = {
        "model": args.model,
        "threads": args.threads,
        "group_size": args.group_size,
        "new_tokens": args.new_tokens,
        "lr": args.lr,
        "precision": args.precision,
        "warmup": args.warmup,
        "steps": args.steps,
    }
    sides = ["matmul", "gen_ours", "gen_hf", "ours"] + ([] if args.skip_trl else ["trl"])
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    started = datetime.datetime.now(datetime.timezone.utc)
    for repeat in range(args.repeats):
        order = sides[repeat % len(sides) :] + sides[: repeat % len(sides)]
        for side in order:
            r = run_worker({**base, "side": side}, args.timeout)
            runs[side].append(r)
            what = (
                f"{r['peak_flops'] / 1e9:.1f} GFLOP/s"
                if side == "matmul"
                else f"{r['tokens_per_s']:.0f} tok/s"
                if side.startswith("gen")
                else f"step {r['step_s']:.3f} s"
            )
            print(f"  repeat {repeat + 1} {side}: {what} (other processes {r['other_cores']})", flush=True)
    peak = _median(runs["matmul"], "peak_flops")
    lines = report(runs, peak, args, started, machine_info(args.threads))
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "peak_flops": peak}, indent=1))
    if not args.no_write:
        with open(args.out, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


def report(
    runs: dict[str, list[dict[str, Any]]], peak: float, args: argparse.Namespace, started: Any, machine: dict
) -> list[str]:
    """Markdown section: GRPO step table with phase split and MFU, rollout table, ratios."""
    lines = [
        f"## GRPO step and rollout speed ({started:%Y-%m-%d %H:%M} UTC)",
        "",
        f"Command: `{' '.join(['python benchmarks/bench_grpo.py', *sys.argv[1:]])}`",
        "",
        f"Machine: {machine.get('cpu', '?')}, {args.threads} threads; torch {machine.get('torch', '?')}, "
        f"transformers {machine.get('transformers', '?')}, trl {machine.get('trl', '?')}. Model: {args.model} "
        f"(random init). 1 prompt x G={args.group_size}, exactly {args.new_tokens} new tokens, no KL, "
        f"one update per batch, DAPO token-mean loss, reward = digit share. Medians of {args.repeats} interleaved "
        f"runs x {args.steps} timed steps (after {args.warmup} warm-up). Precision: {args.precision} ("
        + (
            "both sides fp32"
            if args.precision == "fp32"
            else "TRL bf16=True (autocast); ours bf16 rollout copy "
            "+ bf16 autocast for the update; weights and optimiser fp32 on both"
        )
        + f"). Matmul peak, the MFU denominator ({'bf16' if args.precision == 'bf16' else 'fp32'} 2048 GEMM, "
        f"same rounds): {peak / 1e9:.1f} GFLOP/s.",
        "",
        "| GRPO step | step s | generate s | reward s | update s | MFU | peak RSS MiB | other cores |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side, label in [("ours", "posttrain"), ("trl", "TRL GRPOTrainer")]:
        if side not in runs:
            continue
        rs = runs[side]
        step = _median(rs, "step_s")
        mfu = rs[0]["flops_per_step"] / step / peak
        others = [r["other_cores"] for r in rs if r["other_cores"] is not None]
        lines.append(
            f"| {label} | {step:.3f} | {_median(rs, 'generate_s'):.3f} | {_median(rs, 'reward_s'):.4f} | "
            f"{_median(rs, 'update_s'):.3f} | {100 * mfu:.1f}% | {_median(rs, 'peak_rss_mib'):,.0f} | "
            f"{max(others):.2f} |"
            if others
            else "- |"
        )
    lines += ["", "| rollout (1 prompt x 8 x 64) | s per call | tokens/s |", "|---|---|---|"]
    for side, label in [("gen_ours", "posttrain HFEngine"), ("gen_hf", "model.generate(num_return_sequences=8)")]:
        rs = runs[side]
        lines.append(f"| {label} | {_median(rs, 'call_s'):.3f} | {_median(rs, 'tokens_per_s'):,.0f} |")
    lines.append("")
    ratio_gen = _median(runs["gen_ours"], "tokens_per_s") / _median(runs["gen_hf"], "tokens_per_s")
    lines.append(f"Rollout: ours / model.generate = **{ratio_gen:.2f}x** tokens/s.")
    if "trl" in runs:
        ratio = _median(runs["trl"], "step_s") / _median(runs["ours"], "step_s")
        lines.append(f"GRPO step: TRL step time / ours = **{ratio:.2f}x**.")
    lines.append(
        f"Prompt length {runs['ours'][0]['prompt_tokens']:.0f} tokens (mean of the first 8); completion tokens per"
        f" step: ours {runs['ours'][0]['completion_tokens']:.0f}"
        + (f", TRL {runs['trl'][0]['completion_tokens']:.0f}." if "trl" in runs else ".")
    )
    return lines


if __name__ == "__main__":
    main()
