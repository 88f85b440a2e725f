"""posttrain synth: rejection-sampled SFT rows and best-vs-worst preference pairs from a model's own samples."""

from __future__ import annotations

import json

import pytest

from posttrain.errors import ConfigError
from posttrain.safeguards.synth import synthesize

N, LIMIT, SEED = 4, 6, 3
REWARD = "synth_rewards:digits"


@pytest.fixture(autouse=True)
def digits_reward(tmp_path, monkeypatch):
    """A reward that varies between samples of the untrained tiny model: how many digits the reply has."""
    (tmp_path / "synth_rewards.py").write_text(
        "def digits(completion, **_):\n    return float(sum(c.isdigit() for c in completion))\n"
    )
    monkeypatch.syspath_prepend(tmp_path)


def _expected(threshold):
    """The same samples drawn again, and the rules applied by hand: the first best-scoring sample if it reaches
    the threshold; best vs worst (first of equals) when their scores differ."""
    from posttrain.data.encode import render_prompt
    from posttrain.data.rows import load_rows
    from posttrain.models.loading import load_model
    from posttrain.rewards import parse_rewards, score_completions
    from posttrain.rollout import HFEngine, SamplingParams

    model, tok = load_model("builtin:tiny-base")
    rows = load_rows("task:arithmetic:val")[:LIMIT]
    params = SamplingParams(n=N, temperature=1.0, max_new_tokens=16)
    seeds = [SEED * 1_000_003 + i for i in range(LIMIT)]
    out = HFEngine(model.eval(), tok).generate([render_prompt(r, tok) for r in rows], params, seed=seeds)
    scores = score_completions(parse_rewards([REWARD]), out.texts, [rows[i] for i in out.prompt_index])
    sft, pairs = [], []
    for i, row in enumerate(rows):
        texts, values = out.texts[i * N : (i + 1) * N], scores.total.tolist()[i * N : (i + 1) * N]
        best, worst = values.index(max(values)), values.index(min(values))
        reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
        if values[best] >= threshold:
            sft.append({"prompt": row["prompt"], "completion": reply(texts[best])})
        if values[best] > values[worst] and texts[best].strip() != texts[worst].strip():
            pairs.append({"prompt": row["prompt"], "chosen": reply(texts[best]), "rejected": reply(texts[worst])})
    return sft, pairs, scores.total.tolist()


def test_synth_keeps_the_best_passing_sample_and_best_vs_worst_pairs(tmp_path):
    from posttrain.data.rows import load_rows, validate_rows

    threshold = 3.0  # at least three digits
    stats = synthesize(
        "builtin:tiny-base",
        "task:arithmetic:val",
        [REWARD],
        out=tmp_path / "s",
        n=N,
        limit=LIMIT,
        max_new_tokens=16,
        threshold=threshold,
        seed=SEED,
    )
    sft, pairs, scores = _expected(threshold)
    got_sft = [json.loads(x) for x in (tmp_path / "s" / "sft.jsonl").read_text().splitlines()]
    got_pairs = [json.loads(x) for x in (tmp_path / "s" / "preferences.jsonl").read_text().splitlines()]
    assert got_sft == sft and got_pairs == pairs
    assert pairs and sft and len(sft) < LIMIT, "the test would not check the selection"
    assert stats["prompts"] == LIMIT and stats["samples"] == LIMIT * N
    assert stats["sft_rows"] == stats["prompts_with_a_pass"] == len(sft)
    assert stats["preference_pairs"] + stats["prompts_without_spread"] + stats["pairs_dropped_same_text"] == LIMIT
    assert stats["reward_mean"] == pytest.approx(sum(scores) / len(scores))
    assert stats["pass_rate"] == pytest.approx(sum(s >= threshold for s in scores) / len(scores))
    assert json.loads((tmp_path / "s" / "synth.json").read_text()) == stats
    # what the trainers take
    assert len(validate_rows(load_rows(tmp_path / "s" / "preferences.jsonl"), "preference", source="p").rows) == len(
        pairs
    )
    assert len(validate_rows(load_rows(tmp_path / "s" / "sft.jsonl"), "sft", source="s").rows) == len(sft)


def test_synth_refuses_bad_settings_and_a_used_out(tmp_path):
    with pytest.raises(ConfigError, match="synth.n"):
        synthesize("builtin:tiny-base", "task:arithmetic:val", ["correct"], out=tmp_path / "a", n=1)
    with pytest.raises(ConfigError, match="synth.temperature"):
        synthesize("builtin:tiny-base", "task:arithmetic:val", ["correct"], out=tmp_path / "a", temperature=0)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="synth.out"):
        synthesize("builtin:tiny-base", "task:arithmetic:val", ["correct"], out=tmp_path / "used")
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"


def test_synth_command_prints_its_statistics(tmp_path, capsys):
    from posttrain.cli import main

    argv = ["synth", "--model", "builtin:tiny-base", "--data", "task:arithmetic:val", "--out", str(tmp_path / "c")]
    assert main([*argv, "--n", "2", "--limit", "2", "--max-new-tokens", "8", "--reward", "correct,format"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["prompts"] == 2 and stats["reward"] == ["correct", "format"]
    assert main([*argv, "--n", "1"]) == 2  # a one-line error, not a traceback
