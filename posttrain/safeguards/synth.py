"""``posttrain synth``: a model, prompts and a verifier or reward model in; training data out (self-improvement).

For every prompt the model samples N completions, the reward functions score them, and two data sets come out:

- ``sft.jsonl``: rejection sampling (STaR, RFT): the best-scoring completion of each prompt whose score reaches
  ``threshold``, as ``{prompt, completion}`` rows;
- ``preferences.jsonl``: the best against the worst completion of each prompt whose scores differ by more than
  ``min_margin`` (and whose texts differ), as ``{prompt, chosen, rejected}`` rows;

plus ``synth.json``: the counts and the filter's statistics (pass rate, prompts with a passing sample, reward
mean, pairs made and why others were not). Both files validate as the SFT and preference rows the trainers take,
so one round of sample -> filter -> train is ``synth`` then ``sft`` or ``dpo``. Conversational prompts give
conversational completions (``[{"role": "assistant", "content": ...}]``).

    >>> import tempfile, json
    >>> out = tempfile.mkdtemp() + "/synth"
    >>> stats = synthesize("builtin:tiny-base", "task:arithmetic:val", ["correct"], n=2, out=out, limit=2,
    ...                    max_new_tokens=8)
    >>> stats["prompts"], stats["samples"]
    (2, 4)
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError


def synthesize(
    model_spec: str,
    data: str,
    reward: list[str],
    *,
    out: str | Path,
    n: int = 8,
    reward_weights: list[float] | None = None,
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    limit: int = 0,
    threshold: float = 1.0,
    min_margin: float = 0.0,
    batch_prompts: int = 16,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Sample ``n`` completions per prompt of ``data`` (the first ``limit``; 0 = all) from ``model_spec``, score
    them with ``reward`` and write ``out``/sft.jsonl, preferences.jsonl and synth.json; returns the stats."""
    import torch

    from posttrain.data.encode import render_prompt
    from posttrain.data.rows import load_rows, validate_rows
    from posttrain.models.loading import load_model
    from posttrain.rewards import check_reward_columns, parse_rewards, score_completions
    from posttrain.rollout import HFEngine, SamplingParams
    from posttrain.rundir import check_model_out, replace_dir

    if n < 2:
        raise ConfigError(f"synth.n: must be at least 2 (a pair needs two samples), got {n}")
    if temperature <= 0:
        raise ConfigError(f"synth.temperature: must be > 0 (greedy samples would all be the same), got {temperature}")
    for key, value in (("max_new_tokens", max_new_tokens), ("batch_prompts", batch_prompts)):
        if value < 1:
            raise ConfigError(f"synth.{key}: must be at least 1, got {value}")
    for key, value in (("limit", limit), ("min_margin", min_margin)):
        if value < 0:
            raise ConfigError(f"synth.{key}: must be >= 0, got {value}")
    out = check_model_out(out, key="synth.out", overwrite=overwrite)
    specs = parse_rewards(reward, reward_weights or [])
    checked = validate_rows(load_rows(data), "prompt", source=data, skip_bad_rows=False)
    rows = checked.rows[:limit] if limit else checked.rows
    check_reward_columns(specs, rows, data, lines=checked.lines)
    started = time.perf_counter()
    model, tokenizer = load_model(model_spec)
    engine = HFEngine(model.eval(), tokenizer)
    params = SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens)
    sft, pairs, rewards = [], [], []
    passing_prompts = no_spread = same_text = 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_prompts):
            batch = rows[start : start + batch_prompts]
            prompts = [render_prompt(r, tokenizer) for r in batch]
            seeds = [seed * 1_000_003 + start + i for i in range(len(batch))]
            rollouts = engine.generate(prompts, params, seed=seeds)
            per_completion = [batch[i] for i in rollouts.prompt_index]
            scores = score_completions(specs, rollouts.texts, per_completion).total.tolist()
            rewards += scores
            for i, row in enumerate(batch):
                texts, values = rollouts.texts[i * n : (i + 1) * n], scores[i * n : (i + 1) * n]
                best = max(range(n), key=lambda k: values[k])  # the first of equals
                worst = min(range(n), key=lambda k: values[k])
                if values[best] >= threshold:
                    passing_prompts += 1
                    sft.append({"prompt": row["prompt"], "completion": _completion(row, texts[best])})
                if values[best] - values[worst] <= min_margin:
                    no_spread += 1
                elif texts[best].strip() == texts[worst].strip():
                    same_text += 1
                else:
                    chosen, rejected = _completion(row, texts[best]), _completion(row, texts[worst])
                    pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
    stats = {
        "model": model_spec,
        "data": data,
        "reward": reward,
        "n": n,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "threshold": threshold,
        "min_margin": min_margin,
        "seed": seed,
        "prompts": len(rows),
        "samples": len(rewards),
        "reward_mean": sum(rewards) / len(rewards) if rewards else None,
        "pass_rate": sum(r >= threshold for r in rewards) / len(rewards) if rewards else None,
        "prompts_with_a_pass": passing_prompts,
        "sft_rows": len(sft),
        "preference_pairs": len(pairs),
        "prompts_without_spread": no_spread,
        "pairs_dropped_same_text": same_text,
        "wall_s": round(time.perf_counter() - started, 3),
    }
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, items in (("sft.jsonl", sft), ("preferences.jsonl", pairs)):
        (tmp / name).write_text("".join(json.dumps(item) + "\n" for item in items))
    (tmp / "synth.json").write_text(json.dumps(stats, indent=1) + "\n")
    replace_dir(tmp, out)
    return stats


def _completion(row: dict[str, Any], text: str) -> Any:
    """A completion in the row's format: assistant messages for a conversational prompt, else the text."""
    return [{"role": "assistant", "content": text}] if isinstance(row["prompt"], list) else text
