"""The ``posttrain synth`` subcommand: argparse wiring only (the work is in ``posttrain.safeguards.synth``)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_synth_parser(sub: Any) -> None:
    """Add the ``synth`` subcommand to an argparse subparsers object (``parser.add_subparsers()``)."""
    synth = sub.add_parser(
        "synth",
        help="self-improvement data: sample N per prompt, score, keep the best passing (SFT) and best-vs-worst pairs",
        description="Sample --n completions per prompt of --data from --model, score them with --reward, and write"
        " --out/sft.jsonl (rejection sampling: each prompt's best completion scoring >= --threshold),"
        " --out/preferences.jsonl (each prompt's best vs worst completion, when their scores differ by more than"
        " --min-margin) and --out/synth.json (counts and filter statistics). E.g. posttrain synth --model"
        " runs/sft/final --data task:arithmetic --reward correct --n 8 --out runs/synth1, then posttrain sft"
        " --data runs/synth1/sft.jsonl or posttrain dpo --data runs/synth1/preferences.jsonl.",
    )
    add = synth.add_argument
    add("--model", required=True, help="model to sample from (dir, adapter dir, builtin:NAME or hub id)")
    add("--data", required=True, help="prompt rows {prompt, ...} (a file or task:NAME[:split])")
    add("--out", required=True, help="output directory (new or empty)")
    add("--reward", default="correct", help="reward functions, comma-separated (as in grpo: correct, rm:DIR, ...)")
    add("--reward-weights", default="", help="one weight per reward function, comma-separated (default 1 each)")
    add("--n", type=int, default=8, help="completions sampled per prompt")
    add("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    add("--max-new-tokens", type=int, default=96, help="generation limit per completion")
    add("--limit", type=int, default=0, help="use the first N prompts (0 = all)")
    add("--threshold", type=float, default=1.0, help="a completion passes (SFT data) when its score is >= this")
    add("--min-margin", type=float, default=0.0, help="a pair needs best - worst score > this")
    add("--batch-prompts", type=int, default=16, help="prompts sampled together")
    add("--seed", type=int, default=0, help="sampling seed (each prompt its own stream)")
    add("--overwrite", action="store_true", help="replace --out if it is a directory posttrain wrote")


def run_synth(args: argparse.Namespace) -> None:
    """Run ``posttrain synth`` from parsed arguments; prints the statistics as one JSON line."""
    from posttrain.errors import ConfigError
    from posttrain.safeguards.synth import synthesize

    try:
        weights = [float(w) for w in args.reward_weights.split(",") if w.strip()]
    except ValueError as err:
        raise ConfigError(f"synth.reward_weights: {err}") from None
    stats = synthesize(
        args.model,
        args.data,
        [r.strip() for r in args.reward.split(",") if r.strip()],
        out=args.out,
        n=args.n,
        reward_weights=weights,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        threshold=args.threshold,
        min_margin=args.min_margin,
        batch_prompts=args.batch_prompts,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(json.dumps(stats))
