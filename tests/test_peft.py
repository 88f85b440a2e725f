"""The peft family in training stages: each method trains, saves an adapter plain ``peft`` loads with equal
logits, and merges; adapters stacked on an earlier adapter stage load as trained (issue 11)."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import SFTConfig, build_config
from posttrain.errors import ConfigError
from posttrain.models.loading import builtin_path, load_model
from posttrain.train.sft import run_sft

IDS = torch.tensor([[5, 17, 23, 42, 8, 9, 30, 11]])


@pytest.fixture()
def rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
    return path


def train(tmp_path, rows, name, **values):
    cfg = build_config(
        SFTConfig,
        {
            "out": str(tmp_path / name),
            "data": str(rows),
            "eval_data": str(rows),
            "max_steps": 2,
            "batch_size": 4,
            "lr": 1e-2,
            "progress": False,
            **values,
        },
        path="sft",
    )
    return run_sft(cfg)


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.mark.parametrize("method", ["lora", "dora", "rslora", "ia3"])
def test_each_method_trains_saves_loads_in_plain_peft_and_merges(tmp_path, rows, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = train(tmp_path, rows, method, peft=method)
    final = tmp_path / method / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert summary["peft"] == method and summary["trainable_parameters"] < summary["parameters"] / 10
    assert config["peft_type"] == ("IA3" if method == "ia3" else "LORA")
    assert config.get("use_dora", False) == (method == "dora") and config.get("use_rslora", False) == (
        method == "rslora"
    )
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_path("tiny-base")), final)
    ours, _ = load_model(str(final))
    base = logits(AutoModelForCausalLM.from_pretrained(builtin_path("tiny-base")))
    trained = logits(plain)
    assert torch.allclose(logits(ours), trained, atol=1e-6)
    assert (trained - base).abs().max() > 1e-3  # the adapter learned something
    merged = plain.merge_and_unload()
    assert torch.allclose(logits(merged), trained, atol=1e-4)


def test_adapters_stacked_on_an_adapter_stage_load_as_trained(tmp_path, rows):
    from peft import PeftModel

    train(tmp_path, rows, "first", peft="lora", lora_rank=4)
    train(tmp_path, rows, "second", peft="lora", lora_rank=4, model=str(tmp_path / "first" / "final"))
    second = tmp_path / "second" / "final"
    config = json.loads((second / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "second" / "base").resolve())
    first, _ = load_model(str(tmp_path / "first" / "final"))
    expected = logits(PeftModel.from_pretrained(first.merge_and_unload(), second))
    loaded, _ = load_model(str(second))
    assert torch.allclose(logits(loaded), expected, atol=1e-5)
    raw, _ = load_model("builtin:tiny-base")
    dropped = logits(PeftModel.from_pretrained(raw, second))  # what the old adapter_config led to
    assert (dropped - expected).abs().max() > 1e-3


def test_peft_settings_are_checked():
    with pytest.raises(ConfigError, match="sft.lora_rank: peft 'ia3' has no rank"):
        build_config(SFTConfig, {"peft": "ia3", "lora_rank": 8}, path="sft")
    with pytest.raises(ConfigError, match="sft.peft: expected one of"):
        build_config(SFTConfig, {"peft": "adalora"}, path="sft")


@pytest.mark.parametrize("stage, method", [("dpo", "ia3"), ("grpo", "dora")])
def test_other_stages_take_every_method(tmp_path, capsys, stage, method):
    from posttrain.cli import main

    args = [stage, "--out", str(tmp_path / stage), "--peft", method, "--max-steps", "1", "--no-progress"]
    if stage == "dpo":
        prefs = tmp_path / "prefs.jsonl"
        rows = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(4)]
        prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
        args += ["--batch-size", "2", "--data", str(prefs), "--eval-data", str(prefs)]
    else:
        args += ["--batch-prompts", "2", "--group-size", "2", "--max-new-tokens", "4", "--eval-limit", "2"]
        args += ["--kl-coef", "0.05"]  # the reference is the base with the adapters switched off
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / stage / "summary.json").read_text())
    assert summary["peft"] == method
    assert json.loads((tmp_path / stage / "final" / "adapter_config.json").read_text())["peft_type"] in ("IA3", "LORA")
