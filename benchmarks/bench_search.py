"""Search speed: best-of-N with one shared prompt prefill vs N independent ``model.generate`` calls, and how much
work tree search does per generated token (it must reuse its parents' KV cache, never recompute a prefix).

    python benchmarks/bench_search.py                  # small model, N = 8, 64 new tokens, 6 prompts, 3 repeats
    python benchmarks/bench_search.py --model tiny --repeats 1 --no-write

Best-of-N: for each prompt, N samples of exactly ``--new-tokens`` tokens (EOS banned before that on both sides,
so both generate the same number of tokens), temperature 1. Ours: one ``HFEngine.generate`` call per prompt
(prefill once, KV cache repeated N times, N rows decoded together). Peer: N calls of
``model.generate(do_sample=True)`` per prompt, one sequence each: what a user without a search engine writes.
Timed: the whole per-prompt work, after one warm-up prompt; the sides alternate prompt by prompt and repeat;
medians of per-repeat tokens/s. Scoring is not timed (it is the same on both sides).

Tree search: the model's processed tokens (every position fed to a forward pass) against the tokens generated,
on the shipped tiny base with arithmetic prompts. A search that recomputed each node's prefix would process
roughly depth x prompt length more.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_info  # noqa: E402


def best_of_n(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from posttrain.models.tiny import build_model, build_tokenizer
    from posttrain.rollout import HFEngine, SamplingParams
    from posttrain.tasks import get_task

    torch.set_num_threads(args.threads)
    tok = build_tokenizer()
    model = build_model(tok, size=args.model, seed=0).eval()
    rows = get_task("arithmetic").rows("test", args.prompts + 1)
    prompts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    n, t = args.n, args.new_tokens
    engine = HFEngine(model, tok)
    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=t, min_new_tokens=t)

    def ours(prompt: str, seed: int) -> int:
        return int(engine.generate([prompt], params, seed=seed).mask.sum())

    def independent(prompt: str, seed: int) -> int:
        enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
        total = 0
        for i in range(n):
            torch.manual_seed(seed * 1000 + i)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=t,
                    min_new_tokens=t,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            total += out.shape[1] - enc["input_ids"].shape[1]
        return total

    rates: dict[str, list[float]] = {"ours": [], "independent": []}
    ours(prompts[0], 0), independent(prompts[0], 0)  # warm-up
    for repeat in range(args.repeats):
        spent = {"ours": [0.0, 0], "independent": [0.0, 0]}
        for i, prompt in enumerate(prompts[1:]):
            sides = [("ours", ours), ("independent", independent)]
            for name, fn in sides if (i + repeat) % 2 == 0 else sides[::-1]:
                start = time.perf_counter()
                tokens = fn(prompt, i + 1)
                spent[name][0] += time.perf_counter() - start
                spent[name][1] += tokens
        for name, (seconds, tokens) in spent.items():
            rates[name].append(tokens / seconds)
        print(f"  repeat {repeat + 1}: ours {rates['ours'][-1]:.0f} tok/s, independent {rates['independent'][-1]:.0f}")
    return {k: statistics.median(v) for k, v in rates.items()} | {"all": rates}


def tree_work(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from posttrain.models.loading import load_model
    from posttrain.search import SearchSpec, search
    from posttrain.tasks import get_task

    torch.set_num_threads(args.threads)
    model, tok = load_model("builtin:tiny-base")
    rows = get_task("arithmetic").rows("test", 10)
    processed: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: processed.append(int(kw["input_ids"].numel())), with_kwargs=True
    )
    spec = SearchSpec(strategy="tree", n=3, keep=2, max_new_tokens=80, scorer=("arithmetic_steps",))
    try:
        results = search(model, tok, rows, spec)
    finally:
        handle.remove()
    prompt_tokens = sum(
        len(tok(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False))["input_ids"])
        for r in rows
    )
    return {
        "questions": len(rows),
        "generated": sum(r.tokens for r in results),
        "processed": sum(processed),
        "prompt_tokens": prompt_tokens,
        "forward_passes": sum(r.forward_passes for r in results),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["small", "tiny"], default="small")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    bon = best_of_n(args)
    tree = tree_work(args)
    info = machine_info(args.threads)
    lines = [
        f"## Search: best-of-N and tree search work ({started:%Y-%m-%d %H:%M} UTC)",
        "",
        f"Command: `{' '.join(['python benchmarks/bench_search.py', *sys.argv[1:]])}`",
        "",
        f"Machine: {info.get('cpu', '?')}, {args.threads} threads; torch {info.get('torch', '?')}, transformers "
        f"{info.get('transformers', '?')}. Model: {args.model} (random init, fp32). N = {args.n} samples of exactly "
        f"{args.new_tokens} new tokens per prompt, {args.prompts} prompts per repeat, medians of {args.repeats} "
        "repeats.",
        "",
        "| best-of-N generation | tokens/s |",
        "|---|---|",
        f"| posttrain (one call: shared prefill, N rows decoded together) | {bon['ours']:,.0f} |",
        f"| {args.n} independent `model.generate` calls (one sequence each) | {bon['independent']:,.0f} |",
        "",
        f"Best-of-N: ours / independent calls = **{bon['ours'] / bon['independent']:.2f}x** tokens/s "
        f"(per repeat: ours {', '.join(f'{x:.0f}' for x in bon['all']['ours'])}; independent "
        f"{', '.join(f'{x:.0f}' for x in bon['all']['independent'])}).",
        "",
        f"Tree search (tiny base, {tree['questions']} arithmetic questions, 3 children per node, keep 2, step "
        f"verifier): {tree['generated']:,} tokens generated, {tree['processed']:,} positions processed by the "
        f"model in {tree['forward_passes']:,} forward passes, of which {tree['prompt_tokens']:,} are the prompts "
        "(one prefill each); the rest are the sampled tokens and masked waits of rows whose step had ended "
        "(the cache rows of a level are decoded together). No prefix is recomputed.",
    ]
    print("\n".join(lines))
    if not args.no_write:
        with open(args.out, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
