"""Forgetting control: the L2-SP pull toward the starting weights, in the scaffold (so in every stage)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import SFTConfig, build_config
from posttrain.losses.regularize import l2sp_gradient_
from posttrain.train.sft import run_sft


def test_l2sp_gradient_is_the_penalty_gradient():
    """coef x (w - w0) added to the existing gradient equals autograd's gradient of loss + coef/2 ||w - w0||^2;
    a parameter without a gradient gets the penalty's alone; the returned distance is ||w - w0||_2."""
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(3, 4, generator=g, requires_grad=True), torch.randn(5, generator=g, requires_grad=True)]
    w0 = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    x = torch.randn(4, generator=g)
    coef = 0.37
    ((w[0] @ x).sum()).backward()  # w[1] gets no gradient from the loss
    distance = l2sp_gradient_(w, w0, coef)
    ref = [t.detach().clone().requires_grad_() for t in w]
    loss = (ref[0] @ x).sum() + coef / 2 * sum(((a - b) ** 2).sum() for a, b in zip(ref, w0))
    loss.backward()
    for a, b in zip(w, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    expected = sum(((a - b) ** 2).sum() for a, b in zip(w, w0)).sqrt()
    assert distance == pytest.approx(float(expected), rel=1e-6)


def _sft(out, stop_after=None, **kw):
    values = {"out": str(out), "max_steps": 6, "batch_size": 4, "lr": 1e-2, "progress": False, "log_every": 1}
    values.update(data="task:arithmetic", eval_data="", **kw)
    return run_sft(build_config(SFTConfig, values, path="sft"), stop_after=stop_after)


def _distance(out):
    from posttrain.models.loading import load_model

    start, _ = load_model("builtin:tiny-base")
    final = load_file(str(out / "final" / "model.safetensors"))
    return sum(float((final[n] - p.detach()).pow(2).sum()) for n, p in start.named_parameters() if n in final) ** 0.5


def test_l2sp_keeps_sft_near_its_start_and_resumes_exactly(tmp_path):
    """With a strong pull the weights end much nearer the start than without, and the distance is logged;
    killed and resumed, the anchor is still the
    stage's starting model (the result is bitwise the uninterrupted one)."""
    _sft(tmp_path / "free")
    _sft(tmp_path / "pulled", l2sp=100.0, save_every=1)
    free, pulled = _distance(tmp_path / "free"), _distance(tmp_path / "pulled")
    assert pulled < 0.5 * free, (pulled, free)
    rows = [json.loads(x) for x in (tmp_path / "pulled" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["l2sp_distance"] for r in rows if "l2sp_distance" in r]
    assert len(logged) == 6 and logged[0] == 0.0 and all(d > 0 for d in logged[1:])
    assert "l2sp_distance" not in json.loads((tmp_path / "free" / "metrics.jsonl").read_text().splitlines()[0])
    _sft(tmp_path / "cut", l2sp=100.0, save_every=1, stop_after=3)
    _sft(tmp_path / "cut", l2sp=100.0, save_every=1, resume=True)
    a = load_file(str(tmp_path / "pulled" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
