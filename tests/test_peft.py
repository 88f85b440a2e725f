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


@pytest.mark.parametrize("method, peft_type", [("prompt", "PROMPT_TUNING"), ("prefix", "PREFIX_TUNING")])
def test_virtual_token_methods_train_save_and_load_in_plain_peft(tmp_path, rows, method, peft_type):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.errors import ModelError
    from posttrain.models.lora import merge_adapter

    summary = train(tmp_path, rows, method, peft=method, virtual_tokens=5, lr=0.1)
    final = tmp_path / method / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config["num_virtual_tokens"] == 5
    assert config["base_model_name_or_path"] == "builtin:tiny-base"  # portable, not this machine's path
    layers, hidden = 4, 128  # the tiny model: prefix = keys and values per layer, prompt = one embedding per token
    assert summary["peft"] == method and summary["trainable_parameters"] == 5 * hidden * (
        2 * layers if method == "prefix" else 1
    )
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_path("tiny-base")), final)
    trained = logits(plain)[:, -IDS.shape[1] :]  # prompt tuning also returns the virtual positions' logits
    base = logits(AutoModelForCausalLM.from_pretrained(builtin_path("tiny-base")))
    assert (trained - base).abs().max() > 1e-2  # the virtual tokens learned something
    ours, _ = load_model(str(final))
    assert torch.allclose(logits(ours)[:, -IDS.shape[1] :], trained, atol=1e-6)
    with pytest.raises(ModelError, match="no weights to fold"):
        merge_adapter("builtin:tiny-base", str(final), tmp_path / "merged")


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_packed_forward_and_decoding_give_each_sequence_what_plain_peft_gives_it(method):
    """Packed rows (bounds and shared-prompt groups) and the rollout engine's cached, left-padded decoding against
    plain peft's own forward on one unpadded sequence at a time."""
    from posttrain.models.forward import packed_logps
    from posttrain.models.lora import add_adapters
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.engine import HFEngine

    base, tok = load_model("builtin:tiny-base")
    torch.manual_seed(0)
    model = add_adapters(base, method, virtual_tokens=3).eval()
    with torch.no_grad():  # move the virtual tokens away from their initialisation
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))

    def alone(ids, targets):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids])).logits[0, -len(ids) :].float().log_softmax(-1)
        return out.gather(-1, torch.tensor(targets)[:, None])[:, 0]

    seqs = [[5, 17, 23, 42, 8], [9, 30, 11], [12, 13, 14, 15]]
    targets = [[s[i + 1] if i + 1 < len(s) else 7 for i in range(len(s))] for s in seqs]
    ids = torch.tensor([sum(seqs, [])])
    pos = torch.tensor([[i for s in seqs for i in range(len(s))]])
    with torch.no_grad():
        got, _ = packed_logps(model, ids, pos, torch.tensor([sum(targets, [])]), posttrain_bounds=(0, 5, 8, 12))
    want = torch.cat([alone(s, t) for s, t in zip(seqs, targets)])
    assert torch.allclose(got[0], want, atol=1e-5), (got[0] - want).abs().max()
    # one prompt [5, 17, 23] shared by two completions [42, 8] and [11, 30, 9]
    ids, pos = torch.tensor([[5, 17, 23, 42, 8, 11, 30, 9]]), torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5]])
    tgt = torch.tensor([[17, 23, 42, 8, 7, 30, 9, 7]])
    with torch.no_grad():
        got, _ = packed_logps(model, ids, pos, tgt, posttrain_groups=((3, (2, 3)),))
    want = torch.cat(
        [alone([5, 17, 23, 42, 8], [17, 23, 42, 8, 7]), alone([5, 17, 23, 11, 30, 9], [17, 23, 11, 30, 9, 7])[-3:]]
    )
    assert torch.allclose(got[0], want, atol=1e-5), (got[0] - want).abs().max()
    # greedy decoding of prompts of different lengths (left padding) = plain peft's argmax, step by step
    prompts = ["12+5=", "3+44+100="]
    out = HFEngine(model, tok).generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=6), seed=0)
    for prompt, row, mask in zip(prompts, out.completion_ids, out.mask):
        ids, generated = tok(prompt, add_special_tokens=False)["input_ids"], []
        for _ in range(int(mask.sum())):
            with torch.no_grad():
                generated.append(int(model(input_ids=torch.tensor([ids + generated])).logits[0, -1].argmax()))
        assert row[mask].tolist() == generated


def test_a_prompt_adapter_stage_goes_on_training_its_adapter(tmp_path, rows):
    """A stage started from a prompt adapter trains that adapter further (it cannot be merged away); asking for
    another method is refused rather than silently dropping the earlier stage."""
    from safetensors.torch import load_file

    train(tmp_path, rows, "first", peft="prompt", virtual_tokens=4, lr=0.1)
    first = tmp_path / "first" / "final"
    train(tmp_path, rows, "second", peft="prompt", virtual_tokens=4, lr=0.1, model=str(first))
    before = load_file(first / "adapter_model.safetensors")["prompt_embeddings"]
    after = load_file(tmp_path / "second" / "final" / "adapter_model.safetensors")["prompt_embeddings"]
    assert before.shape == after.shape and 1e-4 < (after - before).abs().max() < 1.0  # continued, not restarted
    with pytest.raises(ConfigError, match="set peft: prompt"):
        train(tmp_path, rows, "third", peft="lora", model=str(first))


def test_peft_settings_are_checked():
    with pytest.raises(ConfigError, match="sft.lora_rank: peft 'ia3' has no rank"):
        build_config(SFTConfig, {"peft": "ia3", "lora_rank": 8}, path="sft")
    with pytest.raises(ConfigError, match="sft.peft: expected one of"):
        build_config(SFTConfig, {"peft": "adalora"}, path="sft")
    with pytest.raises(ConfigError, match="sft.virtual_tokens: must be at least 1"):
        build_config(SFTConfig, {"peft": "prompt", "virtual_tokens": 0}, path="sft")


@pytest.mark.parametrize("stage, method", [("dpo", "ia3"), ("grpo", "dora"), ("dpo", "prefix"), ("grpo", "prompt")])
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
    kinds = ("IA3", "LORA", "PREFIX_TUNING", "PROMPT_TUNING")
    assert json.loads((tmp_path / stage / "final" / "adapter_config.json").read_text())["peft_type"] in kinds
