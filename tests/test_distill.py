"""Distillation: the divergences by hand and against an independent loop, the top-K bins, the chunked loss, and the
stage: its first loss equals one computed from plain forwards, the top-K cache, on-policy sampling, exact resume,
and refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from posttrain.losses.chunked import chunked_divergence
from posttrain.losses.distill import forward_kl, generalized_jsd, reverse_kl, topk_bins


def _logps(*probs):
    return torch.log(torch.tensor([list(probs)], dtype=torch.float64))


# --- the maths ------------------------------------------------------------------------------------------------
def test_divergences_by_hand():
    s, t = _logps(0.5, 0.5), _logps(0.75, 0.25)
    assert_close(forward_kl(s, t), torch.tensor([0.75 * math.log(1.5) + 0.25 * math.log(0.5)], dtype=torch.float64))
    assert_close(
        reverse_kl(s, t), torch.tensor([0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0)], dtype=torch.float64)
    )
    # β = 0.5: M = (0.625, 0.375); 0.5 KL(t‖M) + 0.5 KL(s‖M)
    kl_t = 0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)
    kl_s = 0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
    assert_close(generalized_jsd(s, t, beta=0.5), torch.tensor([0.5 * kl_t + 0.5 * kl_s], dtype=torch.float64))
    assert_close(generalized_jsd(s, t, beta=0.0), forward_kl(s, t))
    assert_close(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t))


def _jsd_loop(s: np.ndarray, t: np.ndarray, beta: float) -> np.ndarray:
    """An independent per-token loop over probabilities (not log-probabilities)."""
    out = []
    for ps, pt in zip(np.exp(s), np.exp(t)):
        m = beta * pt + (1 - beta) * ps
        out.append(sum(beta * a * math.log(a / c) + (1 - beta) * b * math.log(b / c) for a, b, c in zip(pt, ps, m)))
    return np.array(out)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_an_independent_loop_and_swaps(beta):
    gen = torch.Generator().manual_seed(0)
    s = torch.log_softmax(torch.randn(6, 9, generator=gen, dtype=torch.float64), -1)
    t = torch.log_softmax(2 * torch.randn(6, 9, generator=gen, dtype=torch.float64), -1)
    ours = generalized_jsd(s, t, beta=beta)
    assert np.allclose(ours.numpy(), _jsd_loop(s.numpy(), t.numpy(), beta), rtol=1e-10, atol=1e-12)
    # Swapping the roles of student and teacher is the same as swapping β for 1 - β.
    assert_close(generalized_jsd(t, s, beta=1 - beta), ours)
    assert (ours > 0).all() and generalized_jsd(s, s, beta=beta).abs().max() < 1e-12


def test_zero_probabilities_give_finite_values_and_gradients():
    student = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[0.0, -math.inf, math.log(0.5)]], dtype=torch.float64).log_softmax(-1)
    for loss in (forward_kl(student.log_softmax(-1), teacher), generalized_jsd(student.log_softmax(-1), teacher)):
        assert torch.isfinite(loss).all()
        (grad,) = torch.autograd.grad(loss.sum(), student)
        assert torch.isfinite(grad).all()


def test_gradcheck_float64():
    t = torch.log_softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    for fn in (forward_kl, reverse_kl, lambda s, t: generalized_jsd(s, t, beta=0.3)):
        x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, fn=fn: fn(torch.log_softmax(x, -1), t), (x,))


def test_topk_bins_by_hand_and_with_one_token_left_out():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    p = torch.softmax(logits, -1)[0]
    bins = topk_bins(logits, torch.tensor([[0, 2]])).exp()[0]
    assert_close(bins, torch.stack([p[0], p[2], p[1] + p[3]]))
    # K = V - 1: the rest bin is the one token left, so the bins are the full distribution (reordered) and the
    # divergence is the full one; with fewer tokens it is a lower bound (coarsening never adds divergence).
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(4, 6, generator=gen, dtype=torch.float64)
    full = forward_kl(s.log_softmax(-1), t.log_softmax(-1))
    top5 = t.topk(5, -1).indices
    assert_close(forward_kl(topk_bins(s, top5), topk_bins(t, top5)), full)
    top2 = t.topk(2, -1).indices
    assert (forward_kl(topk_bins(s, top2), topk_bins(t, top2)) <= full + 1e-12).all()


def test_chunked_divergence_equals_unchunked_with_gradients():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(7, 4, generator=gen, requires_grad=True)
    weight = torch.randn(11, 4, generator=gen, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(7, 11, generator=gen), -1)

    def jsd(s, t):
        return generalized_jsd(s, t, beta=0.3)

    chunked, _ = chunked_divergence(
        hidden, weight, lambda a, b: (teacher[a:b], None), jsd, chunk_size=3, temperature=2.0
    )
    full = jsd(torch.log_softmax(hidden @ weight.T / 2.0, -1), teacher)
    assert_close(chunked, full)
    g1 = torch.autograd.grad(chunked.sum(), (hidden, weight))
    g2 = torch.autograd.grad(full.sum(), (hidden, weight))
    for a, b in zip(g1, g2):
        assert_close(a, b)


# --- the stage ------------------------------------------------------------------------------------------------
ROWS = [
    {"prompt": "2+3=", "completion": "5"},
    {"prompt": "10+7=", "completion": "17"},
    {"prompt": "4+4=", "completion": "8"},
    {"prompt": "9+1=", "completion": "10"},
]


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


def _cfg(tmp_path, data, teacher, name="run", **extra):
    from posttrain.config import DistillConfig, build_config

    values = {
        "out": str(tmp_path / name),
        "model": "builtin:tiny-base",
        "teacher": teacher,
        "data": data,
        "max_steps": 1,
        "batch_size": 4,
        "lr": 1e-3,
        "log_every": 1,
        "progress": False,
        **extra,
    }
    return build_config(DistillConfig, values, path="distill")


def _reference_loss(student, teacher, data, beta, temperature):
    """Step 1's loss from plain, unpacked forwards: the divergence over every completion token of the 4 rows."""
    from posttrain.data.prepare import prepare_examples
    from posttrain.models.loading import load_model

    student_model, tok = load_model(student)
    teacher_model, _ = load_model(teacher)
    examples = prepare_examples(data, tok, kind="sft", max_length=512, length_policy="truncate", completion_only=True)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples.examples:
            ids = torch.tensor([e.input_ids])
            mask = torch.tensor(e.loss_mask[1:])
            s = torch.log_softmax(student_model(ids).logits[0, :-1] / temperature, -1)[mask]
            t = torch.log_softmax(teacher_model(ids).logits[0, :-1] / temperature, -1)[mask]
            total += float(generalized_jsd(s.double(), t.double(), beta=beta).sum())
            count += int(mask.sum())
    return total / count


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_first_loss_equals_plain_forwards(tmp_path, data, tiny_model_dir):
    from posttrain.train.distill import run_distill

    teacher = str(tiny_model_dir)  # a random tiny model: far from the pretrained student
    run_distill(_cfg(tmp_path, data, teacher, beta=0.3, temperature=2.0))
    logged = _metrics(tmp_path / "run")[0]["loss"]
    assert logged == pytest.approx(_reference_loss("builtin:tiny-base", teacher, data, 0.3, 2.0), rel=1e-4)
    # A student distilled from itself has nothing to learn: every divergence is 0.
    run_distill(_cfg(tmp_path, data, "builtin:tiny-base", name="self", loss="forward_kl"))
    assert _metrics(tmp_path / "self")[0]["loss"] == pytest.approx(0.0, abs=1e-6)


def test_topk_cache_with_all_but_one_token_equals_the_full_teacher(tmp_path, data, tiny_model_dir):
    from safetensors.torch import load_file

    from posttrain.models.loading import load_tokenizer
    from posttrain.train.distill import CACHE_FILE, run_distill

    vocab = len(load_tokenizer("builtin:tiny-base"))
    run_distill(_cfg(tmp_path, data, str(tiny_model_dir), name="full", loss="reverse_kl"))
    summary = run_distill(
        _cfg(tmp_path, data, str(tiny_model_dir), name="top", loss="reverse_kl", teacher_top_k=vocab - 1)
    )
    assert summary["distill"]["teacher_top_k"] == vocab - 1
    full, top = _metrics(tmp_path / "full")[0]["loss"], _metrics(tmp_path / "top")[0]["loss"]
    assert top == pytest.approx(full, rel=1e-5)
    cached = load_file(str(tmp_path / "top" / CACHE_FILE))
    assert cached["ids"].shape[1] == vocab - 1 and cached["logps"].shape[1] == vocab
    # Top 4 only: a coarser comparison, so a smaller divergence than the full one.
    run_distill(_cfg(tmp_path, data, str(tiny_model_dir), name="top4", loss="reverse_kl", teacher_top_k=4))
    assert _metrics(tmp_path / "top4")[0]["loss"] < full


def test_on_policy_steps_sample_from_the_student(tmp_path, data, tiny_model_dir):
    from posttrain.data.encode import Example
    from posttrain.models.loading import load_model
    from posttrain.train.distill import run_distill, sampled_completions

    model, tok = load_model("builtin:tiny-base")
    example = Example([1, 5, 6, 7, 8, 9], [False, False, False, True, True, True])
    cfg = _cfg(tmp_path, data, str(tiny_model_dir), max_new_tokens=5, max_length=512)
    out = sampled_completions(model, tok, [example, example], [3, 3], cfg)
    assert out[0] == out[1]  # same seed, same sample
    assert out[0].input_ids[:3] == [1, 5, 6] and out[0].loss_mask[:3] == [False] * 3
    assert all(out[0].loss_mask[3:]) and 1 <= len(out[0].input_ids) - 3 <= 5
    summary = run_distill(
        _cfg(tmp_path, data, str(tiny_model_dir), name="onp", lmbda=1.0, max_steps=2, max_new_tokens=6)
    )
    records = _metrics(tmp_path / "onp")
    assert [r["on_policy"] for r in records] == [1, 1] and summary["distill"]["on_policy_steps"] == 2
    assert all(r["completion_tokens"] <= 4 * 6 for r in records)


def test_distill_resumes_exactly(tmp_path, data, tiny_model_dir):
    from safetensors.torch import load_file

    from posttrain.train.distill import run_distill

    common = dict(max_steps=4, lmbda=0.5, max_new_tokens=4, batch_size=2, seed=3)
    run_distill(_cfg(tmp_path, data, str(tiny_model_dir), name="whole", **common))
    run_distill(_cfg(tmp_path, data, str(tiny_model_dir), name="parts", save_every=1, **common), stop_after=2)
    run_distill(_cfg(tmp_path, data, str(tiny_model_dir), name="parts", save_every=1, resume=True, **common))
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "parts" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    on = [r["on_policy"] for r in _metrics(tmp_path / "whole")]
    assert 0 < sum(on) < 4  # both kinds of step ran
    assert [r["on_policy"] for r in _metrics(tmp_path / "parts")] == on


def test_bad_distill_settings_are_clear_errors(tmp_path, data, tiny_model_dir, capsys):
    from posttrain.cli import main
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="distill.teacher"):
        _cfg(tmp_path, data, "")
    with pytest.raises(ConfigError, match="teacher_top_k"):
        _cfg(tmp_path, data, str(tiny_model_dir), teacher_top_k=8, lmbda=0.5)
    with pytest.raises(ConfigError, match="beta"):
        _cfg(tmp_path, data, str(tiny_model_dir), beta=1.5)
    # A teacher with another vocabulary: refused before training, through the CLI without a traceback.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["<extra>"])
    other = tmp_path / "other"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(other)
    tok.save_pretrained(other)
    code = main(["distill", "--teacher", str(other), "--data", data, "--out", str(tmp_path / "x"), "--max-steps", "1",
                 "--no-progress"])  # fmt: skip
    assert code == 2 and "different tokenizers" in capsys.readouterr().err


def test_distill_recipe_reports_teacher_and_both_students(tmp_path, tiny_model_dir):
    """The recipe cut to one step per stage, the teacher swapped for a saved tiny model: every stage row carries
    accuracy, parameters, size on disk and generation speed, and the student is the half-depth one."""
    from posttrain.pipeline import RECIPES, load_recipe, run_recipe

    cut = ["sft_only.max_steps=1", "distilled.max_steps=1", "sft_only.batch_size=2", "distilled.batch_size=2"]
    small = [
        "evaluate.limit=3",
        "evaluate.max_new_tokens=8",
        "distilled.max_new_tokens=8",
        "evaluate.tasks=[arithmetic]",
    ]
    recipe = load_recipe(RECIPES / "distill.yaml", [f"teacher.use={tiny_model_dir}", *cut, *small])
    summary = run_recipe(recipe, out=str(tmp_path / "run"), progress=False)
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["teacher", "student", "sft_only", "distilled"]
    assert stages["distilled"]["train"]["distill"]["teacher"] == str(tiny_model_dir)
    teacher, student = stages["teacher"]["eval"], stages["distilled"]["eval"]
    assert student["params"] == 538_112 and teacher["params"] == 1_062_912
    assert 0 < student["size_mb"] < teacher["size_mb"] and student["tokens_per_s"] > 0


@pytest.mark.parametrize(("extra", "on_policy"), [({"seq_kd": True}, 0), ({"lmbda": 1.0}, 1)])
def test_sampled_completions_replace_the_dataset_ones(tmp_path, data, tiny_model_dir, extra, on_policy, monkeypatch):
    """seq_kd (teacher samples) and on-policy steps (student samples) train on completions of max_new_tokens=1:
    exactly one completion token per row, where the dataset's completions have 2-3 (digits and EOS); the model
    sampled from is the teacher for seq_kd and the student on-policy."""
    from posttrain.train import distill

    sampled_from = []
    real = distill.sampled_completions

    def spy(model, *args, **kwargs):
        sampled_from.append(str(getattr(model, "name_or_path", "")))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(distill, "sampled_completions", spy)
    distill.run_distill(_cfg(tmp_path, data, str(tiny_model_dir), name="s", max_new_tokens=1, **extra))
    record = _metrics(tmp_path / "s")[0]
    assert record["completion_tokens"] == 4 and record["on_policy"] == on_policy
    assert sampled_from == [str(tiny_model_dir) if on_policy == 0 else "builtin:tiny-base"]
    run_distill = distill.run_distill
    run_distill(_cfg(tmp_path, data, str(tiny_model_dir), name="d"))
    assert _metrics(tmp_path / "d")[0]["completion_tokens"] == 10
