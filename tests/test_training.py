"""The scaffold on the SFT stage: exact accumulation, packed == padded, exact resume, non-finite steps, LoRA."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.testing import assert_close

from posttrain.config import SFTConfig, build_config
from posttrain.data.batching import pack
from posttrain.data.encode import encode_row
from posttrain.errors import TrainingError
from posttrain.eval.loss import packed_token_losses
from posttrain.losses import token_logps
from posttrain.tasks import get_task
from posttrain.train.checkpoint import latest_checkpoint
from posttrain.train.sft import train


def cfg(tmp_path, **kw):
    base = {
        "out": str(tmp_path),
        "max_steps": 4,
        "batch_size": 4,
        "lr": 3e-3,
        "warmup_steps": 1,
        "log_every": 1,
        "progress": False,
        "seed": 0,
    }
    return build_config(SFTConfig, {**base, **kw}, path="sft")


@pytest.fixture(scope="module")
def examples():
    from posttrain.models.tiny import build_tokenizer

    tok = build_tokenizer()
    return [encode_row(r, tok) for r in get_task("arithmetic").rows("val", 24)]


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_one_batch_of_8_equals_8_micro_batches_of_1(tmp_path, tokenizer, examples):
    from posttrain.models.tiny import build_model

    a, b = build_model(tokenizer, seed=0), build_model(tokenizer, seed=0)
    train(a, examples, cfg(tmp_path / "a", max_steps=2, batch_size=8, grad_accum=1), tmp_path / "a")
    train(b, examples, cfg(tmp_path / "b", max_steps=2, batch_size=8, grad_accum=8), tmp_path / "b")
    wa, wb = weights(a), weights(b)
    for name in wa:
        assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)
    assert (
        wa["model.embed_tokens.weight"].ne(weights(build_model(tokenizer, seed=0))["model.embed_tokens.weight"]).any()
    )


def test_packed_equals_padded_logps(tiny_model, examples):
    exs = examples[:3]
    batch = pack(exs)
    with torch.no_grad():
        losses, _ = packed_token_losses(tiny_model, batch)
        packed = -losses[0][batch.target_mask[0]]
        # Padded reference: each sequence alone, right-padded, with HF's own attention mask.
        width = max(len(e.input_ids) for e in exs)
        ids = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in exs])
        attn = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in exs])
        logits = tiny_model(input_ids=ids, attention_mask=attn).logits
        ref = []
        for i, e in enumerate(exs):
            lp = token_logps(logits[i : i + 1, :-1], ids[i : i + 1, 1:])[0]
            ref.append(lp[: len(e.input_ids) - 1][torch.tensor(e.loss_mask[1:])])
    assert_close(packed, torch.cat(ref), rtol=1e-4, atol=1e-5)


def _run(tmp_path, tokenizer, examples, name, stop_after=None, resume=False, **kw):
    from posttrain.models.tiny import build_model

    model = build_model(tokenizer, seed=0)
    c = cfg(tmp_path / name, max_steps=7, save_every=2, resume=resume, **kw)
    train(model, examples, c, tmp_path / name, stop_after=stop_after)
    return model


def test_resume_twice_is_bit_identical(tmp_path, tokenizer, examples):
    full = weights(_run(tmp_path, tokenizer, examples, "full"))
    _run(tmp_path, tokenizer, examples, "cut", stop_after=3)  # dies after step 3; newest checkpoint is step 2
    assert latest_checkpoint(tmp_path / "cut").name == "step_2"
    _run(tmp_path, tokenizer, examples, "cut", stop_after=5, resume=True)  # resumes at 2, dies after 5
    resumed = weights(_run(tmp_path, tokenizer, examples, "cut", resume=True))  # resumes at 4, finishes
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [r["step"] for r in reference]
    assert [r["loss"] for r in lines] == [r["loss"] for r in reference]


def test_partial_checkpoints_are_ignored(tmp_path, tokenizer, examples):
    _run(tmp_path, tokenizer, examples, "run", stop_after=4)
    root = tmp_path / "run" / "checkpoints"
    shutil.copytree(root / "step_4", root / ".tmp-step_6")  # killed before the rename
    shutil.copytree(root / "step_4", root / "step_8")
    (root / "step_8" / "MANIFEST.json").unlink()  # killed before the manifest
    shutil.copytree(root / "step_4", root / "step_9")
    (root / "step_9" / "optimizer.pt").write_bytes(b"truncated")  # size no longer matches the manifest
    assert latest_checkpoint(tmp_path / "run").name == "step_4"


def test_resume_without_checkpoint_starts_fresh(tmp_path, tokenizer, examples):
    a = weights(_run(tmp_path, tokenizer, examples, "a", resume=True))
    b = weights(_run(tmp_path, tokenizer, examples, "b"))
    assert all(torch.equal(a[n], b[n]) for n in a)


def nan_on_steps(bad_calls):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        losses, correct = packed_token_losses(model, batch)
        if calls["n"] in bad_calls:
            losses = losses * float("nan")
        return losses, correct

    return loss_fn


def test_non_finite_step_is_skipped_and_counted(tmp_path, tokenizer, examples):
    from posttrain.models.tiny import build_model

    model = build_model(tokenizer, seed=0)
    before = weights(model)
    result = train(model, examples, cfg(tmp_path, max_steps=1), tmp_path, loss_fn=nan_on_steps({1}))
    assert result.skipped_steps == 1
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["skipped"] is True and record["skipped_steps"] == 1


def test_repeated_non_finite_steps_stop_the_run_keeping_last_checkpoint(tmp_path, tokenizer, examples):
    from posttrain.models.tiny import build_model

    model = build_model(tokenizer, seed=0)
    c = cfg(tmp_path, max_steps=10, save_every=2, max_bad_steps=3)
    with pytest.raises(TrainingError, match="3 non-finite") as err:
        train(model, examples, c, tmp_path, loss_fn=nan_on_steps({3, 4, 5, 6}))
    assert "step_2" in str(err.value)
    assert latest_checkpoint(tmp_path).name == "step_2"


def test_lora_changes_only_adapter_weights(tmp_path, tiny_model, examples):
    from posttrain.models.lora import add_lora

    model = add_lora(tiny_model, rank=4)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    train(model, examples, cfg(tmp_path, max_steps=3), tmp_path)
    for n, p in model.named_parameters():
        if "lora_" in n:
            continue
        assert torch.equal(p, base_before[n]), n
    changed = [n for n, p in model.named_parameters() if "lora_" in n and not torch.equal(p, lora_before[n])]
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
