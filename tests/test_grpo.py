"""GRPO trainer: pinned run, exact resume, reference/KL wiring, dynamic sampling."""

from __future__ import annotations

import json

import pytest
import torch
from pinned import grpo_config
from safetensors.torch import load_file

from posttrain.train.grpo import run_grpo


def cfg(out, **kw):
    return grpo_config(out, **kw)


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_run_logs_every_metric_and_one_engine_agrees_with_itself(tmp_path):
    run_grpo(cfg(tmp_path))
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in (
        "loss",
        "reward_mean",
        "reward_std",
        "reward_correct_lenient",
        "reward_length_penalty",
        "accuracy_strict",
        "accuracy_lenient",
        "kl",
        "entropy",
        "clip_fraction",
        "completion_length",
        "zero_std_fraction",
        "generate_s",
        "reward_s",
        "reference_s",
        "update_s",
        "logp_diff_max",
    ):
        assert key in rows[0], key
    assert max(r["logp_diff_max"] for r in rows) < 1e-4
    assert all(r["clip_fraction"] == 0.0 for r in rows)  # one update per batch: ratio 1, nothing clipped
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_resume_twice_equals_uninterrupted(tmp_path):
    run_grpo(cfg(tmp_path / "full", save_every=1))
    run_grpo(cfg(tmp_path / "cut", save_every=1), stop_after=2)
    run_grpo(cfg(tmp_path / "cut", save_every=1, resume=True), stop_after=3)
    run_grpo(cfg(tmp_path / "cut", save_every=1, resume=True))
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = ("generate_s", "reward_s", "reference_s", "update_s", "step_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(metrics(tmp_path / "full")) == strip(metrics(tmp_path / "cut"))


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_kl_is_zero_before_the_first_update_and_grows_after(tmp_path, lora_rank):
    run_grpo(cfg(tmp_path, kl_coef=0.1, lora_rank=lora_rank, lr=1e-3 if lora_rank else 3e-4, max_steps=3))
    rows = metrics(tmp_path)
    assert rows[0]["kl"] == 0.0  # policy == reference (a copy, or the base with adapters off)
    assert rows[-1]["kl"] > 0.0


def test_reference_only_when_needed(tmp_path, tiny_model):
    from posttrain.train.rl import make_reference

    assert make_reference(tiny_model, cfg(tmp_path)) is None  # kl_coef 0: no reference at all
    assert make_reference(tiny_model, cfg(tmp_path, kl_coef=0.1, lora_rank=4)) is None  # adapters off instead
    ref = make_reference(tiny_model, cfg(tmp_path, kl_coef=0.1))
    assert ref is not tiny_model and not any(p.requires_grad for p in ref.parameters())


def test_dynamic_sampling_trains_only_on_varied_groups(tmp_path):
    run_grpo(cfg(tmp_path, dynamic_sampling=True, reward=["correct"], reward_weights=[], max_steps=3))
    for r in metrics(tmp_path):
        assert r["kept_completions"] == round((1 - r["zero_std_fraction"]) * 2) * 4


def test_held_out_accuracy_is_logged_before_every_n_steps_and_after_the_last(tmp_path):
    from posttrain.eval.harness import heldout_accuracy as held_out_accuracy
    from posttrain.models.loading import load_model
    from posttrain.rollout import HFEngine
    from posttrain.tasks import get_task

    # The base copies text in capitals well and adds badly: uppercase rows give a non-trivial accuracy to check.
    run_grpo(cfg(tmp_path, eval_every=3, eval_limit=6, eval_data="task:uppercase:val"))
    evals = {r["step"]: r["eval_accuracy_strict"] for r in metrics(tmp_path) if "eval_accuracy_strict" in r}
    assert sorted(evals) == [0, 3, 4]
    model, tok = load_model(str(tmp_path / "final"))
    rows = get_task("uppercase").rows("val", 6)
    again = held_out_accuracy(HFEngine(model, tok), rows, max_new_tokens=24)
    assert 0 < again["eval_accuracy_strict"] == evals[4]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval_accuracy_strict"] == evals[4]


def test_held_out_accuracy_needs_rows_with_answers(tmp_path):
    from posttrain.errors import ConfigError, DataError

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Write in capitals: dog", "answer": "DOG"}\n')
    with pytest.raises(ConfigError, match="grpo.eval_data"):
        run_grpo(cfg(tmp_path / "a", data=str(prompts), eval_every=1))
    no_answer = tmp_path / "q.jsonl"
    no_answer.write_text('{"prompt": "Write in capitals: dog"}\n')
    with pytest.raises(DataError, match="q.jsonl:1.*answer"):
        run_grpo(cfg(tmp_path / "b", data=str(prompts), eval_every=1, eval_data=str(no_answer)))
