"""DPO-family trainer: log 2 at the start, reference handling (precomputed, LoRA adapters off, none for
reference-free losses), exact resume, KTO rows, bad rows."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import DPOConfig, build_config
from posttrain.errors import DataError
from posttrain.tasks import get_task
from posttrain.train.dpo import run_dpo


def pairs_file(tmp_path, n=24):
    path = tmp_path / "pairs.jsonl"
    rows = get_task("arithmetic_prefs").rows("val", n)
    path.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows))
    return path


def cfg(tmp_path, out, **kw):
    values = {
        "model": "builtin:tiny-base",
        "data": str(pairs_file(tmp_path)),
        "out": str(out),
        "max_steps": 4,
        "batch_size": 4,
        "lr": 1e-3,
        "log_every": 1,
        "progress": False,
        "seed": 0,
        "max_length": 256,
    }
    return build_config(DPOConfig, {**values, **kw}, path="dpo")


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora_rank, precision", [(0, "no"), (4, "no"), (0, "bf16")])
def test_first_dpo_loss_is_log_2_and_the_margin_then_grows(tmp_path, lora_rank, precision):
    lr = 5e-3 if lora_rank else 1e-3
    run_dpo(cfg(tmp_path, tmp_path / "run", lora_rank=lora_rank, lr=lr, max_steps=6, mixed_precision=precision))
    rows = metrics(tmp_path / "run")
    # policy == reference at step 1 (under bf16 only if the reference ran under the same autocast as the policy)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["margin"] > 0 and rows[-1]["loss"] < math.log(2)
    ref = load_file(str(tmp_path / "run" / "reference_logps.safetensors"))["train"]
    assert ref.shape == (24, 2) and torch.isfinite(ref).any()


def test_resume_twice_equals_uninterrupted(tmp_path):
    run_dpo(cfg(tmp_path, tmp_path / "full", save_every=1))
    run_dpo(cfg(tmp_path, tmp_path / "cut", save_every=1), stop_after=2)
    run_dpo(cfg(tmp_path, tmp_path / "cut", save_every=1, resume=True), stop_after=3)
    run_dpo(cfg(tmp_path, tmp_path / "cut", save_every=1, resume=True))
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "step_s"} for r in rows]  # noqa: E731
    assert strip(metrics(tmp_path / "full")) == strip(metrics(tmp_path / "cut"))


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_compute_no_reference(tmp_path, loss):
    run_dpo(cfg(tmp_path, tmp_path / loss, loss=loss, max_steps=2))
    assert not (tmp_path / loss / "reference_logps.safetensors").exists()
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / loss))


@pytest.mark.parametrize("loss", ["cdpo", "ipo"])
def test_other_paired_losses_train(tmp_path, loss):
    run_dpo(cfg(tmp_path, tmp_path / loss, loss=loss, max_steps=3))
    rows = metrics(tmp_path / loss)
    assert rows[-1]["margin"] > rows[0]["margin"]


def test_kto_on_unpaired_rows(tmp_path):
    path = tmp_path / "unpaired.jsonl"
    rows = get_task("arithmetic_prefs").rows("val", 12)
    lines = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows]
    lines += [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in rows]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_dpo(cfg(tmp_path, tmp_path / "kto", data=str(path), loss="kto", max_steps=3))
    first = metrics(tmp_path / "kto")[0]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # r = 0, z = 0: 1 - sigma(0) for every row


def test_bad_preference_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'rejected'"):
        run_dpo(cfg(tmp_path, tmp_path / "x", data=str(path)))
    path.write_text('{"prompt": "a", "completion": "b", "label": "yes"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'label'.*true or false"):
        run_dpo(cfg(tmp_path, tmp_path / "y", data=str(path), loss="kto"))
    assert not (tmp_path / "x" / "final").exists()
