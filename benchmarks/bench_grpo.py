"""GRPO speed: posttrain's trainer vs TRL's ``GRPOTrainer``, and our rollout engine vs ``model.generate``.

    python benchmarks/bench_grpo.py                       # small model, 2 warm-up + 8 timed steps, 3 repeats
    python benchmarks/bench_grpo.py --model tiny --steps 3 --repeats 1 --no-write    # a quick check
    python benchmarks/bench_grpo.py --model smollm2 --precision bf16 --steps 4 --warmup 1 --repeats 2 --floor

The work (the issue's standard setting): the standard small model (random init, fp32; ``--model smollm2``: the real
SmolLM2-135M-Instruct, its weights, BPE tokenizer and chat template on both sides), one prompt per step,
G = 8 completions of exactly 64 new tokens (EOS is not sampled before the 64th token on either side:
``min_new_tokens`` 63 in the GRPO steps, as ours requires min < max, and 64 in the rollout comparison),
temperature 1, no KL term (so no reference model), one policy update per rollout batch, the same reward (the
share of digits in the completion, so groups have varied rewards), the same prompts in the same order (their token
ids are recorded on both sides and compared), the same learning rate and loss normalisation (DAPO token mean).
``--precision bf16``: TRL ``bf16=True`` (autocast); ours a bf16 rollout copy and bf16 autocast for the update;
the rollout comparison then runs both engines on a bf16 copy of the model.

What is timed:
- GRPO step: wall time of one whole optimiser step (generation, reward, advantages, forward/backward, optimiser
  step). Ours: the training scaffold's own ``step_s`` (metrics.jsonl; the end-of-run checkpoint and ``final/``
  save are outside every step); TRL: between ``on_step_end`` callbacks (its per-step logging inside). The phase split
  (generate / reward / update = the rest) comes from the trainers' own timers (ours) or wrapped methods (TRL's
  ``_generate`` and ``_calculate_rewards``).
- Rollout: tokens/s of 1 prompt x 8 samples x 64 new tokens: ``HFEngine.generate`` (prefill once, KV cache
  repeated 8 times) vs ``model.generate(..., do_sample=True, num_return_sequences=8)``.

MFU counts the same model FLOPs for both sides: 2N per generated token and per prompt token of one prefill,
plus 6N per token of the 8 prompt+completion sequences trained on; the matmul peak of the run's precision (fp32 or
bf16) is measured in the same rounds. Every configuration and repeat runs in its own subprocess, interleaved;
medians are reported.
"""

from __future__ import annotations

import argparse
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
    load_bench_model,
    machine_info,
    matmul_peak_flops,
    model_label,
    model_source,
    peak_dtype,
    peak_rss_mib,
    rollout_floor,
    step_floor,
)
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
    from posttrain.tasks import get_task

    model, tok = load_bench_model(spec["model"], seed=0)
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in get_task("arithmetic").rows("train", 64)]
    return tok, model, rows


def _prompt_tokens(tok: Any, rows: list[dict], spec: dict[str, Any]) -> float:
    """Mean prompt length (tokens) over the prompts the GRPO steps take (the first 8 of them)."""
    prompts = _generation_prompts(tok, [rows[i] for i in step_order(spec, len(rows))], 8)
    return statistics.mean(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)


def step_order(spec: dict[str, Any], size: int) -> list[int]:
    """The prompt rows our GRPO steps take, in order (the scaffold's seeded ``ResumableSampler``, one prompt per
    step); TRL is handed the rows in this order (``shuffle_dataset=False``), so both sides see the same prompts."""
    from posttrain.data.batching import ResumableSampler

    sampler = ResumableSampler(size, seed=0)
    return [i for _ in range(spec["warmup"] + spec["steps"]) for i in sampler.take(1)]


def _prompt_fingerprint(prompt_ids: list[list[int]]) -> str:
    """Hash of the token ids of the prompts the steps generated from, in order."""
    return hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest()[:16]


def _flops(spec: dict[str, Any], params: int, prompt_tokens: float) -> float:
    """Model FLOPs of one step (see the module docstring); identical for both sides."""
    g, t = spec["group_size"], spec["new_tokens"]
    return 2 * params * (prompt_tokens + g * t) + 6 * params * g * (prompt_tokens + t)


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from posttrain.config import GRPOConfig, build_config
    from posttrain.rollout import HFEngine
    from posttrain.train.grpo import run_grpo

    tok, model, rows = _setup(spec)
    params = sum(p.numel() for p in model.parameters())
    prompt_ids: list[list[int]] = []  # per generate call, the first prompt's ids (one prompt per step)
    real_generate = HFEngine.generate

    def recording_generate(self: Any, prompts: list[str], *args: Any, **kwargs: Any) -> Any:
        prompt_ids.append(tok(prompts[0], add_special_tokens=False)["input_ids"])
        return real_generate(self, prompts, *args, **kwargs)

    with tempfile.TemporaryDirectory() as tmp:
        source = model_source(spec["model"], model, tok, Path(tmp) / "model")
        del model  # the stage loads its own copy from cfg.model
        data = Path(tmp) / "prompts.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = build_config(
            GRPOConfig,
            {
                "model": source,
                "data": str(data),
                "out": str(Path(tmp) / "run"),
                "reward": ["benchmarks.bench_grpo:digit_share"],
                "group_size": spec["group_size"],
                "batch_prompts": 1,
                "max_new_tokens": spec["new_tokens"],
                "min_new_tokens": spec["new_tokens"] - 1,  # must be < max; EOS can only be the last token
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
        HFEngine.generate = recording_generate
        try:
            meter = LoadMeter().start()
            run_grpo(cfg)
            load = meter.stop()
        finally:
            HFEngine.generate = real_generate
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    # One record per step (log_every=1); step_s is the scaffold's clock around the stage's step (generation,
    # reward, update, engine refresh) and the scheduler step. The end of run (checkpoint, final/) is outside it.
    records = [r for r in map(json.loads, lines) if "step_s" in r]
    timed = records[spec["warmup"] :]
    prompt_tokens = _prompt_tokens(tok, rows, spec)
    return {
        "step_s": statistics.median(r["step_s"] for r in timed),
        "generate_s": statistics.median(r["generate_s"] for r in timed),
        "reward_s": statistics.median(r["reward_s"] for r in timed),
        "update_s": statistics.median(r["update_s"] + r.get("reference_s", 0.0) for r in timed),
        "completion_tokens": statistics.mean(r["completion_length"] for r in timed) * spec["group_size"],
        "all_step_s": [r["step_s"] for r in records],
        "reward_mean": [round(r["reward_mean"], 4) for r in records],
        "prompt_fingerprint": _prompt_fingerprint(prompt_ids[: len(records)]),
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
            generation_kwargs={"min_new_tokens": spec["new_tokens"] - 1},  # as ours
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
            train_dataset=datasets.Dataset.from_list([rows[i] for i in step_order(spec, len(rows))]),
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
        prompt_ids: list[list[int]] = []  # per step, the first prompt's ids (its G copies are the same prompt)
        tokenize_prompts = trainer._tokenize_prompts

        def recording_tokenize(prompts: list) -> Any:
            out = tokenize_prompts(prompts)
            prompt_ids.append(list(out[0][0]))
            return out

        trainer._tokenize_prompts = recording_tokenize
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
    prompt_tokens = _prompt_tokens(tok, rows, spec)
    return {
        "step_s": statistics.median(steps[w:]),
        "generate_s": statistics.median(gen),
        "reward_s": statistics.median(rew),
        "update_s": statistics.median(update),
        "completion_tokens": statistics.mean(h.get("completions/mean_length", 0) for h in history[w:])
        * spec["group_size"],
        "all_step_s": [round(s, 4) for s in steps],
        "reward_mean": [round(h["reward"], 4) for h in history],
        "prompt_fingerprint": _prompt_fingerprint(prompt_ids[: len(steps)]),
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
    flops = matmul_peak_flops(threads=spec["threads"], size=2048, repeats=10, dtype=peak_dtype(spec["precision"]))
    return {"peak_flops": flops, **meter.stop()}


def run_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """Measured floors (``benchmarks.machine``): of one rollout call, and of our update, whose prompt is run once
    per group (prefix attention): prompt + G x new tokens."""
    tok, model, rows = _setup(spec)
    prompt = round(_prompt_tokens(tok, rows, spec))
    g, t, common = spec["group_size"], spec["new_tokens"], {"precision": spec["precision"], "threads": spec["threads"]}
    return {
        "rollout": rollout_floor(model, batch=g, prompt_tokens=prompt, new_tokens=t, **common),
        "update": step_floor(model, tokens=prompt + g * t, **common),
    }


WORKERS = {
    "ours": run_ours,
    "trl": run_trl,
    "gen_ours": run_gen_ours,
    "gen_hf": run_gen_hf,
    "matmul": run_matmul,
    "floor": run_floor,
}


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
    p.add_argument(
        "--model", choices=MODELS, default="small", help="small/tiny: random init; smollm2: SmolLM2-135M-Instruct"
    )
    p.add_argument("--steps", type=int, default=8, help="timed steps (and generate calls) per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (interleaved)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per completion (exactly)")
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate (both sides)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 everywhere, or each side's bf16 mode (TRL: bf16=True, autocast; ours: bf16 rollouts + autocast)",
    )
    p.add_argument("--skip-trl", action="store_true", help="time ours only")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also measure the floors: a rollout call's matmuls, and our update's matmuls + optimiser (one run)",
    )
    p.add_argument(
        "--wait-quiet", type=float, default=0, help="before each run, wait up to this many s for a quiet machine"
    )
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
            r = run_worker({**base, "side": side}, args.timeout, wait_quiet=args.wait_quiet)
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
    floor = run_worker({**base, "side": "floor"}, args.timeout, wait_quiet=args.wait_quiet) if args.floor else None
    lines = report(runs, peak, args, started, machine_info(args.threads), floor)
    emit_report(lines, args, {"runs": runs, "peak_flops": peak})


def report(
    runs: dict[str, list[dict[str, Any]]],
    peak: float,
    args: argparse.Namespace,
    started: Any,
    machine: dict,
    floor: dict[str, Any] | None = None,
) -> list[str]:
    """Markdown section: GRPO step table with phase split and MFU, rollout table, ratios, targets."""
    g, t = args.group_size, args.new_tokens
    lines = [
        f"## GRPO step and rollout speed, {args.model}, {args.precision} ({started:%Y-%m-%d %H:%M} UTC)",
        "",
        f"Command: `{' '.join(['python benchmarks/bench_grpo.py', *sys.argv[1:]])}`",
        "",
        f"Machine: {machine.get('cpu', '?')}, {args.threads} threads; torch {machine.get('torch', '?')}, "
        f"transformers {machine.get('transformers', '?')}, trl {machine.get('trl', '?')}. Model: "
        f"{model_label(args.model)}, {runs['ours'][0]['params']:,} parameters. 1 prompt x G={g}, exactly {t} new "
        "tokens, no KL, one update per batch, DAPO token-mean loss, reward = digit share. Medians of "
        f"{args.repeats} interleaved runs x {args.steps} timed steps (after {args.warmup} warm-up). Precision: "
        f"{args.precision} ("
        + (
            "both sides fp32"
            if args.precision == "fp32"
            else "TRL bf16=True (autocast); ours bf16 rollout copy "
            "+ bf16 autocast for the update; weights and optimiser fp32 on both; rollout comparison on a bf16 copy"
        )
        + f"). Matmul peak, the MFU denominator ({peak_dtype(args.precision)} 2048 GEMM, same rounds): "
        f"{peak / 1e9:.1f} GFLOP/s.",
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
            + (f"{max(others):.2f} |" if others else "n/a |")
        )
    lines += ["", f"| rollout (1 prompt x {g} x {t}) | s per call | tokens/s | other cores |", "|---|---|---|---|"]
    for side, label in [("gen_ours", "posttrain HFEngine"), ("gen_hf", f"model.generate(num_return_sequences={g})")]:
        rs = runs[side]
        others = [r["other_cores"] for r in rs if r["other_cores"] is not None]
        lines.append(
            f"| {label} | {_median(rs, 'call_s'):.3f} | {_median(rs, 'tokens_per_s'):,.0f} | "
            + (f"{max(others):.2f} |" if others else "n/a |")
        )
    lines.append("")
    real = args.model == "smollm2" and args.precision == "bf16"  # the targets are for this setting
    ratio_gen = _median(runs["gen_ours"], "tokens_per_s") / _median(runs["gen_hf"], "tokens_per_s")
    lines.append(
        f"Rollout: ours / model.generate = **{ratio_gen:.2f}x** tokens/s"
        + (f"; target >= 2x: **{'met' if ratio_gen >= 2 else 'NOT met'}**." if real else ".")
    )
    if "trl" in runs:
        ratio = _median(runs["trl"], "step_s") / _median(runs["ours"], "step_s")
        lines.append(
            f"GRPO step: TRL step time / ours = **{ratio:.2f}x**"
            + (f"; target >= 2x: **{'met' if ratio >= 2 else 'NOT met'}**." if real else ".")
        )
        same = runs["trl"][0]["prompt_fingerprint"] == runs["ours"][0]["prompt_fingerprint"]
        lines.append(f"Same prompt token ids in the same order on both sides: {'yes' if same else '**NO**'}.")
    lines.append(
        f"Prompt length {runs['ours'][0]['prompt_tokens']:.0f} tokens (mean of the first 8 steps' prompts);"
        f" completion tokens per step: ours {runs['ours'][0]['completion_tokens']:.0f}"
        + (f", TRL {runs['trl'][0]['completion_tokens']:.0f}." if "trl" in runs else ".")
    )
    if floor:
        lines += floor_report(floor, runs, args)
    return lines


def floor_report(floor: dict[str, Any], runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> list[str]:
    """What the measured floors allow: the best ratios any implementation of ours could reach against the peer's
    measured times, when it spent no time outside the matmuls (and, for the step, the optimiser)."""
    roll, update = floor["rollout"], floor["update"]
    g, t = args.group_size, args.new_tokens
    hf_call = _median(runs["gen_hf"], "call_s")
    lines = [
        "",
        f"Measured floors (`--floor`, {args.precision}; matmuls only, each layer's own weights): a rollout call"
        f" (prefill {update['tokens'] - g * t} prompt tokens once + {t} decode steps of {g} rows) cannot take less"
        f" than {roll['call_s']:.3f} s ({1000 * roll['decode_step_s']:.1f} ms per decode step, prefill"
        f" {roll['prefill_s']:.3f} s), so ours / model.generate <= {hf_call / roll['call_s']:.2f}x with the"
        f" measured model.generate ({hf_call:.3f} s per call).",
    ]
    if "trl" in runs:
        step = roll["call_s"] + update["floor_s"]
        trl = _median(runs["trl"], "step_s")
        lines.append(
            f"Our GRPO step cannot take less than {step:.3f} s: that rollout floor + the update's matmuls on"
            f" {update['tokens']} tokens (prompt once per group + {g} x {t}) {update['matmul_s']:.3f} s + AdamW and"
            f" clip {update['optimizer_s']:.3f} s; so TRL step time / ours <= {trl / step:.2f}x with the measured"
            f" TRL step ({trl:.3f} s)."
        )
    return lines


if __name__ == "__main__":
    main()
