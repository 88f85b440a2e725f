"""The ``posttrain`` command: one sub-command per stage, plus ``run`` (a recipe) and ``demo`` (the quickstart).

Every training flag is a field of the stage's config (``--lora-rank`` is ``lora_rank``) and can also be set in
a YAML recipe or with ``--set key=value``. User errors print one clear line and exit with status 2.

    $ posttrain sft --model builtin:tiny-base --data task:arithmetic --out runs/sft --max-steps 200 --lr 2e-3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import typing
from collections.abc import Sequence
from typing import Any

from posttrain.config import EvalConfig, build_config, field_help
from posttrain.errors import ConfigError, PosttrainError
from posttrain.safeguards.commands import add_synth_parser, run_synth
from posttrain.stages import STAGES
from posttrain.toolbox import MERGE_METHODS
from posttrain.toolbox.commands import add_prune_parser, add_quantize_parser, run_prune, run_quantize


def _flag_value(raw: str, tp: Any, flag: str) -> Any:
    """Convert a flag's text to the field's type (numbers, lists as a,b,c); errors name the flag."""
    origin = typing.get_origin(tp)
    try:
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if origin is list:
            item = typing.get_args(tp)[0]
            return [item(x.strip()) if item in (int, float) else x for x in raw.split(",") if x.strip()]
    except ValueError:
        item = typing.get_args(tp)[0] if origin is list else tp
        kind = (
            ("a list of integers" if item is int else "a list of numbers")
            if origin is list
            else ("an integer" if tp is int else "a number")
        )
        raise ConfigError(f"{flag}: expected {kind}, got {raw!r}") from None
    return raw


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{field_help(cls)[f.name]} (default: {default!r})".replace("%", "%%")  # argparse formats help
        if hints[f.name] is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else None
            parser.add_argument(
                flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), choices=choices, help=help_text
            )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key (repeatable)",
    )


def _stage_config(cls: type, args: argparse.Namespace, stage: str) -> Any:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item}: expected key=value")
        key = key.removeprefix(f"{stage}.")
        values[key] = _flag_value(raw, hints[key], f"--set {key}") if key in hints else raw
        if key in hints and hints[key] is bool:
            values[key] = raw.lower() in ("1", "true", "yes", "on")
    for name in hints:
        if name in vars(args):
            raw = getattr(args, name)
            values[name] = (
                raw if isinstance(raw, bool) else _flag_value(raw, hints[name], "--" + name.replace("_", "-"))
            )
    return build_config(cls, values, path=stage)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="LLM post-training: SFT, RL, search, evaluation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="the built-in quickstart: pretrain -> SFT -> eval on the embedded default")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument(
        "--from-scratch", action="store_true", help="pretrain the base on the spot instead of using the shipped one"
    )
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_run_dir_flags(demo)
    run = sub.add_parser("run", help="run a YAML recipe (stages in order, evaluated after each)")
    run.add_argument("recipe", help="recipe file")
    run.add_argument("--out", default=None, help="run directory (default: the recipe's out)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_run_dir_flags(run)
    for info in STAGES.values():
        p = sub.add_parser(
            info.name, help=info.description, description=info.description + "\n\n" + (info.config.__doc__ or "")
        )
        _add_config_flags(p, info.config)
    description = "accuracy (strict/lenient/fair), pass@k, perplexity and search strategies on held-out rows"
    _add_config_flags(sub.add_parser("eval", help=description, description=description), EvalConfig)
    gen = sub.add_parser("generate", help="generate completions for prompts")
    gen.add_argument("--model", required=True)
    gen.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    gen.add_argument("--raw", action="store_true", help="use prompts as raw text (no chat template)")
    gen.add_argument(
        "--strategy",
        choices=["greedy", "sample", "best_of_n", "self_consistency", "beam", "tree"],
        default="greedy",
        help="decoding or search strategy (search strategies print the chosen completion and its candidates)",
    )
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--scorer", default="logprob", help="search scorer(s), comma-separated")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--max-new-tokens", type=int, default=96)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights and activations (a quantized model: of what is not quantized)",
    )
    inspect = sub.add_parser(
        "inspect", help="show training rows as the model sees them: rendered, tokenised, trained tokens marked"
    )
    inspect.add_argument("--model", default="builtin:tiny-base", help="model (its tokenizer and chat template)")
    inspect.add_argument("--data", default="task:arithmetic", help="rows (.jsonl/.parquet/.csv, task:NAME)")
    inspect.add_argument("--n", type=int, default=3, help="rows to show")
    inspect.add_argument("--max-length", type=int, default=512, help="tokens kept per row")
    inspect.add_argument("--chat-template", default="", help="a Jinja chat template file instead of the model's")
    inspect.add_argument("--all-tokens", action="store_true", help="train on all tokens (completion_only_loss off)")
    merge = sub.add_parser(
        "merge",
        help="merge models (--method M --models A B ...) or fold an adapter into its base (--model --lora): a plain"
        " HF model",
        description="Two forms. Fold one adapter into its base: posttrain merge --model BASE --lora ADAPTER --out DIR."
        " Merge two or more fine-tunes of one architecture and tokenizer (full models or adapters, adapters folded"
        " into their base first): posttrain merge --method ties --models A B --base BASE --density 0.5 --out DIR.",
    )
    merge.add_argument("--model", help="base model to fold --lora into (dir, builtin:NAME or hub id)")
    merge.add_argument("--lora", help="PEFT adapter directory to fold into --model")
    merge.add_argument("--method", choices=MERGE_METHODS, help="merge method for --models")
    merge.add_argument("--models", nargs="+", metavar="MODEL", help="models or adapters to merge (two or more)")
    merge.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="one weight per model (default: equal; 1 each for task vectors)",
    )
    merge.add_argument("--t", type=float, default=0.5, help="slerp position: 0 gives the first model, 1 the second")
    merge.add_argument(
        "--base",
        help="the model the inputs were fine-tuned from (task_arithmetic, ties, dare_*; default: adapters' base)",
    )
    merge.add_argument("--density", type=float, help="ties/dare: fraction of each task vector kept (0, 1]")
    merge.add_argument("--seed", type=int, default=0, help="dare: seed of the random drops")
    merge.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="saved weights")
    merge.add_argument("--out", required=True, help="output model directory (new or empty)")
    merge.add_argument(
        "--overwrite", action="store_true", help="replace --out if it is a model directory posttrain wrote"
    )
    add_prune_parser(sub)
    add_quantize_parser(sub)
    add_synth_parser(sub)
    return parser


def _merge(args: argparse.Namespace) -> None:
    from posttrain.rundir import check_model_out

    if (args.model or args.lora) and (args.method or args.models):
        raise ConfigError("merge: use either --model BASE --lora ADAPTER, or --method M --models A B ..., not both")
    if args.model or args.lora:
        if not (args.model and args.lora):
            raise ConfigError("merge: folding an adapter needs both --model BASE and --lora ADAPTER")
        from posttrain.models.lora import merge_adapter

        check_model_out(args.out, key="merge.out", overwrite=args.overwrite)
        print(merge_adapter(args.model, args.lora, args.out))
        return
    if not (args.method and args.models):
        raise ConfigError("merge: give --method M --models A B ... (or --model BASE --lora ADAPTER to fold an adapter)")
    from posttrain.toolbox.merge import check_merge_args, merge_models

    check_merge_args(args.method, args.models, weights=args.weights, t=args.t, base=args.base, density=args.density)
    check_model_out(args.out, key="merge.out", overwrite=args.overwrite)
    record = merge_models(
        args.method,
        args.models,
        args.out,
        weights=args.weights,
        t=args.t,
        base=args.base,
        density=args.density,
        seed=args.seed,
        dtype=args.dtype,
    )
    print(json.dumps({"out": str(args.out), **record}))


def _add_run_dir_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue every stage from its newest checkpoint")
    group.add_argument(
        "--overwrite", action="store_true", help="replace the run in --out (only what posttrain wrote is removed)"
    )


def _generate(args: argparse.Namespace) -> None:
    import torch

    from posttrain.data.encode import render_prompt
    from posttrain.eval.generate import generate_texts
    from posttrain.models.loading import load_model

    if not args.prompt:
        raise ConfigError("generate: give at least one --prompt")
    for flag, value in (("--n", args.n), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise ConfigError(f"generate {flag}: must be at least 1, got {value}")
    if not args.temperature > 0 or args.temperature == float("inf"):
        raise ConfigError(f"generate --temperature: must be a positive number, got {args.temperature}")
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    torch.manual_seed(args.seed)
    rows = [{"prompt": p if args.raw else [{"role": "user", "content": p}]} for p in args.prompt]
    if args.strategy not in ("greedy", "sample"):
        from posttrain.search import SearchSpec, search

        spec = SearchSpec(
            strategy=args.strategy,
            n=args.n,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            scorer=tuple(args.scorer.split(",")),
            seed=args.seed,
        )
        results = search(model, tokenizer, rows, spec)
        print(
            json.dumps(
                [
                    {"prompt": p, "completion": r.completion, "candidates": r.candidates, "tokens": r.tokens}
                    for p, r in zip(args.prompt, results)
                ],
                indent=1,
            )
        )
        return
    prompts = [render_prompt(r, tokenizer) for r in rows]
    outs = generate_texts(
        model,
        tokenizer,
        prompts,
        n=args.n,
        do_sample=args.strategy == "sample",
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
    )
    print(json.dumps([{"prompt": p, "completions": o} for p, o in zip(args.prompt, outs.texts)], indent=1))


def _inspect(args: argparse.Namespace) -> None:
    """Print the first ``--n`` rows rendered and tokenised, trained tokens between ``«`` and ``»``."""
    from posttrain.data.encode import encode_row
    from posttrain.data.rows import load_rows, validate_rows
    from posttrain.models.loading import load_tokenizer
    from posttrain.models.templates import use_chat_template

    if args.n < 1 or args.max_length < 1:
        raise ConfigError("inspect --n and --max-length: must be at least 1")
    tokenizer = use_chat_template(load_tokenizer(args.model), args.chat_template, key="inspect --chat-template")
    checked = validate_rows(load_rows(args.data)[: args.n], "sft", source=args.data)
    for row, line in zip(checked.rows, checked.lines):
        example = encode_row(row, tokenizer, completion_only=not args.all_tokens, max_length=args.max_length)
        ids, mask = example.input_ids[: args.max_length], example.loss_mask[: args.max_length]
        shown, inside = [], False
        for token, trained in zip(ids, mask):
            if trained != inside:
                shown.append("«" if trained else "»")
                inside = trained
            shown.append(tokenizer.decode([token]))
        shown.append("»" if inside else "")
        print(f"--- {args.data}:{line}: {len(ids)} tokens, {sum(mask)} trained")
        print("".join(shown))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``posttrain`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show progress; per-file loading bars are noise here
    # bitsandbytes (the qlora extra; peft imports it whenever installed) warns on every import that it cannot fetch
    # an optional CPU kernel from the model hub, which posttrain never uses: not the user's business.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        if args.command == "demo":
            from posttrain.pipeline import run_demo

            run_demo(
                out=args.out,
                from_scratch=args.from_scratch,
                progress=not args.no_progress,
                resume=args.resume,
                overwrite=args.overwrite,
            )
        elif args.command == "run":
            from posttrain.pipeline import load_recipe, run_recipe

            run_recipe(
                load_recipe(args.recipe, args.overrides),
                out=args.out,
                progress=not args.no_progress,
                resume=args.resume,
                overwrite=args.overwrite,
            )
        elif args.command in STAGES:
            info = STAGES[args.command]
            summary = info.run(_stage_config(info.config, args, info.name))
            if summary.get("world_size", 1) == 1 or _rank() == 0:
                print(json.dumps({k: summary.get(k) for k in info.prints}))
        elif args.command == "eval":
            from posttrain.eval.harness import evaluate, format_examples

            result = evaluate(_stage_config(EvalConfig, args, "eval"))
            print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=1))
            if result.get("examples"):  # to stderr: stdout stays one JSON document
                print(format_examples(result["examples"]), file=sys.stderr)
        elif args.command == "generate":
            _generate(args)
        elif args.command == "inspect":
            _inspect(args)
        elif args.command == "merge":
            _merge(args)
        elif args.command == "prune":
            run_prune(args)
        elif args.command == "quantize":
            run_quantize(args)
        elif args.command == "synth":
            run_synth(args)
    except PosttrainError as err:
        return _fail(args.command, str(err), 2)
    except KeyboardInterrupt:
        print(f"posttrain {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from posttrain.distributed import another_rank_failed

        if _world() > 1 and another_rank_failed():
            # A peer already reported its error and left; a collective failed here as a consequence: no traceback.
            return _fail(args.command, f"stopped: another rank failed ({type(err).__name__})", 1)
        raise
    return 0


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _fail(command: str, message: str, status: int) -> int:
    """Print a user error once per job (under torchrun: by the first rank that hits it) and exit every rank."""
    from posttrain.distributed import report_error_once

    if report_error_once(message):
        where = f" (rank {_rank()} of {_world()})" if _world() > 1 else ""
        print(f"posttrain {command}: error{where}: {message}", file=sys.stderr, flush=True)
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:  # torchrun's failure summary then shows this message as the root cause
            record = {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}
            with open(error_file, "w") as f:
                json.dump({"message": record}, f)
    if _world() > 1:
        # Peers may be blocked in a collective that will never complete: leave now, torchrun stops the rest.
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
