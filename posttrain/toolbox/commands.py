"""The toolbox's sub-commands (``prune``, ``quantize``; ``merge`` lives in ``posttrain.cli``): argument parsers
built without importing torch, so ``posttrain --help`` stays fast; each runner imports its tool when it runs.

    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="posttrain")
    >>> add_prune_parser(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["prune", "--model", "M", "--out", "D", "--method", "2:4"]).method
    '2:4'
    >>> add_quantize_parser(parser._subparsers._group_actions[0])
    >>> parser.parse_args(["quantize", "--model", "M", "--out", "D", "--method", "int4"]).int4_type
    'nf4'
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from posttrain.toolbox import INT4_TYPES, PRUNE_METHODS, QUANT_METHODS, STRUCTURED


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


def add_quantize_parser(sub: Any) -> None:
    """Add the ``quantize`` subcommand to an argparse subparsers object (``parser.add_subparsers()``)."""
    quantize = sub.add_parser(
        "quantize",
        help="weight-only int8 (torchao) or int4 (bitsandbytes NF4/FP4) quantization: reloads for eval and generate",
        description="Store the linear layers' weights as int8 (torchao: one scale per output row) or 4-bit codes"
        " (bitsandbytes: NF4 or FP4, one scale per 64 weights); the embeddings and output head stay in --dtype. The"
        " output directory loads with load_model and plain transformers (with the library installed:"
        " pip install 'posttrain[quantize]'). E.g. posttrain quantize --model DIR --method int8 --out DIR.",
    )
    add = quantize.add_argument
    add("--model", required=True, help="model to quantize (dir, adapter dir, builtin:NAME or hub id)")
    add("--out", required=True, help="output model directory (new or empty)")
    add("--method", choices=QUANT_METHODS, required=True, help="int8 (torchao) or int4 (bitsandbytes)")
    add("--int4-type", choices=INT4_TYPES, default="nf4", help="int4: NormalFloat (nf4) or 4-bit float (fp4) levels")
    add("--double-quant", action="store_true", help="int4: quantize the per-block scales too (~0.4 bits/weight less)")
    add(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="unquantized weights, activations",
    )
    add("--overwrite", action="store_true", help="replace --out if it is a model directory posttrain wrote")


def run_quantize(args: argparse.Namespace) -> None:
    """Run ``posttrain quantize`` from parsed arguments; prints the record as one JSON line."""
    from posttrain.rundir import check_model_out
    from posttrain.toolbox.quantize import check_quantize_args, quantize_model

    options = dict(int4_type=args.int4_type, double_quant=args.double_quant)
    check_quantize_args(args.method, **options)
    check_model_out(args.out, key="quantize.out", overwrite=args.overwrite)
    print(json.dumps(quantize_model(args.model, args.out, method=args.method, **options, dtype=args.dtype)))
