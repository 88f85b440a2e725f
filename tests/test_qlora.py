"""QLoRA (``posttrain.models.quant``): the base really is 4-bit and frozen, LoRA gradients flow through it even
after an eval pass (the bitsandbytes CPU repacking trap), and the adapter reloads with plain peft."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

from posttrain.errors import ModelError
from posttrain.models import quant
from posttrain.models.loading import builtin_path, load_tokenizer
from posttrain.models.lora import add_lora

BASE = "builtin:tiny-base"


@pytest.fixture()
def batch():
    ids = load_tokenizer(BASE)(["12+7=19\n3+4=7\n10+25=35\n", "8+8=16\n41+2=43\n6+7=13\n9+"])["input_ids"]
    ids = torch.tensor([row[:20] for row in ids])
    return {"input_ids": ids, "labels": ids}


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"]).logits


@pytest.mark.parametrize("package", ["bitsandbytes", "accelerate"])
def test_load_4bit_names_the_extra_when_a_package_of_it_is_missing(monkeypatch, package):
    installed = metadata.version

    def version(name):
        if name == package:
            raise metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(ModelError, match=rf"needs {package}: pip install 'posttrain\[qlora\]'"):
        quant.load_4bit(BASE)


def test_linears_are_4bit_and_frozen_and_lora_grads_reach_every_layer_after_an_eval_pass(batch):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    model = quant.load_4bit(BASE)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert len(linears) == 4 * 7 and all(isinstance(m, bnb.nn.Linear4bit) for m in linears.values())
    for m in linears.values():  # two 4-bit codes per byte
        assert m.weight.dtype == torch.uint8 and 2 * m.weight.numel() == m.in_features * m.out_features
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())

    fp32 = AutoModelForCausalLM.from_pretrained(builtin_path("tiny-base"))
    fp32_loss = fp32(**batch).loss.item()
    lora = add_lora(model, rank=4)
    logits(lora, batch)  # an eval pass without gradients: where bitsandbytes would repack for inference
    loss = lora.train()(**batch).loss
    loss.backward()
    assert abs(loss.item() - fp32_loss) < 0.05 * fp32_loss  # NF4 moves the loss a little, not a lot
    grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    lora_b = {n: g for n, g in grads.items() if "lora_B" in n}
    assert len(lora_b) == 4 * 7 and all(g is not None and g.abs().sum() > 0 for g in lora_b.values())
    assert all("lora_" in n for n in grads)  # the base stays frozen


def test_adapter_trained_on_4bit_reloads_with_equal_logits_and_merges_into_the_fp32_base(tmp_path, batch):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = add_lora(quant.load_4bit(BASE), rank=4)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        lora.train()(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = logits(lora, batch)
    lora.save_pretrained(tmp_path)

    reloaded = PeftModel.from_pretrained(quant.load_4bit(BASE), tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), trained, rtol=0, atol=1e-6)
    assert (trained - logits(quant.load_4bit(BASE), batch)).abs().max() > 1e-2  # the adapter learned something

    fp32 = AutoModelForCausalLM.from_pretrained(builtin_path("tiny-base"))
    base_loss = fp32(**batch).loss.item()
    on_fp32 = PeftModel.from_pretrained(fp32, tmp_path)
    unmerged = logits(on_fp32, batch)
    merged = on_fp32.merge_and_unload()
    torch.testing.assert_close(logits(merged, batch), unmerged, rtol=0, atol=1e-4)
    assert merged(**batch).loss.item() < base_loss  # what it learned on the 4-bit base carries over


def test_qlora_stage_trains_lora_on_a_4bit_base_and_saves_an_adapter_of_the_full_precision_base(tmp_path, batch):
    """``--peft qlora`` in a training stage: the trained layers are 4-bit (peak memory and trainable counts say
    so), the adapter names the builtin base and, loaded on a fresh 4-bit base, differs from it."""
    pytest.importorskip("bitsandbytes")
    import json

    from peft import PeftModel

    from posttrain.config import SFTConfig, build_config
    from posttrain.train.sft import run_sft

    values = {"peft": "qlora", "lora_rank": 4, "max_steps": 3, "batch_size": 4, "lr": 1e-2, "progress": False}
    summary = run_sft(build_config(SFTConfig, {**values, "out": str(tmp_path / "run")}, path="sft"))
    assert summary["peft"] == "qlora" and summary["lora"]
    # rank 4 on 4 layers x (q, k, v, o: 128 -> 128; gate, up: 128 -> 512; down: 512 -> 128): r x (in + out) each
    assert summary["trainable_parameters"] == 4 * (4 * 4 * (128 + 128) + 3 * 4 * (128 + 512))
    config = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == BASE
    reloaded = PeftModel.from_pretrained(quant.load_4bit(BASE), tmp_path / "run" / "final")
    assert (logits(reloaded, batch) - logits(quant.load_4bit(BASE), batch)).abs().max() > 1e-2
