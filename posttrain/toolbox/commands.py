"""The toolbox's sub-commands (``prune``; ``merge`` lives in ``posttrain.cli``): argument parsers built without
importing torch, so ``posttrain --help`` stays fast; each runner imports its tool when it runs.

    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="posttrain")
    >>> add_prune_parser(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["prune", "--model", "M", "--out", "D", "--method", "2:4"]).method
    '2:4'
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from posttrain.toolbox import PRUNE_METHODS, STRUCTURED


def add_prune_parser(sub: Any) -> None:
    """Add the ``prune`` subcommand to an argparse subparsers object (``parser.add_subparsers()``)."""
    prune = sub.add_parser(
        "prune",
        help="prune a model (magnitude, wanda, 2:4, or whole heads/MLP channels): a plain HF model",
        description="Zero the lowest-scoring weights of every decoder linear layer (--method magnitude|wanda|2:4"
        " --sparsity S), or remove whole attention heads or MLP channels (--structured heads|mlp) so the saved model"
        " is smaller; optionally fine-tune briefly with the pruned weights held at zero (--recover-steps N). E.g."
        " posttrain prune --model DIR --method wanda --sparsity 0.5 --calibration task:arithmetic --out DIR.",
    )
    add = prune.add_argument
    add("--model", required=True, help="model to prune (dir, adapter dir, builtin:NAME or hub id)")
    add("--out", required=True, help="output model directory (new or empty)")
    add("--method", choices=PRUNE_METHODS, default="magnitude", help="how weights (or heads, channels) are scored")
    add("--sparsity", type=float, help="fraction of weights (structured: heads/channels per layer) removed, [0, 1)")
    add("--structured", choices=STRUCTURED, help="remove whole attention heads or MLP channels")
    add("--calibration", metavar="DATA", help="calibration rows (wanda; optional for 2:4): task:NAME or a file")
    add("--calibration-rows", type=int, default=32, help="calibration rows used (the first N)")
    add("--max-length", type=int, default=256, help="tokens per calibration or recovery row at most")
    add("--recover-steps", type=int, default=0, help="recovery fine-tune steps (0 = none)")
    add("--recover-data", help="recovery fine-tune rows (default task:arithmetic)")
    add("--recover-lr", type=float, default=1e-4, help="recovery fine-tune learning rate")
    add("--seed", type=int, default=0, help="recovery fine-tune seed")
    add("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="saved weights")
    add("--overwrite", action="store_true", help="replace --out if it is a model directory posttrain wrote")


def run_prune(args: argparse.Namespace) -> None:
    """Run ``posttrain prune`` from parsed arguments; prints the record as one JSON line."""
    from posttrain.rundir import check_model_out
    from posttrain.toolbox.prune import check_prune_args, prune_model

    checks = dict(structured=args.structured, calibration=args.calibration, calibration_rows=args.calibration_rows)
    checks.update(max_length=args.max_length, recover_steps=args.recover_steps, recover_data=args.recover_data)
    check_prune_args(args.method, args.sparsity, **checks)
    check_model_out(args.out, key="prune.out", overwrite=args.overwrite)
    options = dict(method=args.method, sparsity=args.sparsity, seed=args.seed, recover_lr=args.recover_lr)
    print(json.dumps(prune_model(args.model, args.out, **options, dtype=args.dtype, **checks)))
