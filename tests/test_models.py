"""Model I/O: Llama, Qwen2 and GPT-2 directories, LoRA targets, adapter and merge round trips, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from posttrain.errors import ModelError
from posttrain.models.loading import load_model


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def arch_dir(request, tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    v = len(tokenizer)
    torch.manual_seed(0)
    if request.param == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=v,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
            )
        )
    elif request.param == "qwen2":
        model = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=v,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
            )
        )
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4))
    return request.param, _save(model, tokenizer, tmp_path_factory.mktemp(request.param))


def test_each_architecture_loads_trains_with_lora_and_merges(arch_dir, tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.data.batching import pack
    from posttrain.data.encode import encode_row
    from posttrain.eval.loss import packed_token_losses
    from posttrain.models.lora import add_lora, merge_adapter

    arch, path = arch_dir
    model, tok = load_model(path)
    assert model.dtype == torch.float32
    lora = add_lora(model, rank=4)
    adapted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in lora.named_parameters() if "lora_A" in n}
    expected = {
        "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        "gpt2": {"c_attn", "c_proj", "c_fc"},
    }[arch]
    assert adapted == expected
    # One training step through the packed path, then make B non-zero so the adapter changes the logits.
    batch = pack([encode_row({"prompt": "ab", "completion": "cd"}, tok)])
    losses, _ = packed_token_losses(lora, batch)
    losses.sum().backward()
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 40, 41, 42, 43]])
    with torch.no_grad():
        want = lora(ids).logits
        # Plain peft (no posttrain) loads the adapter and gives the same logits.
        fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter")
        assert_close(fresh(ids).logits, want)
    merge_adapter(path, str(tmp_path / "adapter"), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())


def test_adapter_dir_loads_with_its_base(tmp_path, tiny_model_dir):
    from posttrain.models.lora import add_lora

    model, tok = load_model(str(tiny_model_dir))
    lora = add_lora(model, rank=2)
    lora.save_pretrained(tmp_path / "ad")
    loaded, _ = load_model(str(tmp_path / "ad"))
    assert type(loaded).__name__ == "PeftModelForCausalLM"


def test_dtype_is_selectable(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "spec, words",
    [("/nonexistent/model", "no such model directory"), ("builtin:nope", "no such shipped model")],
)
def test_missing_model_is_a_clear_error(spec, words):
    with pytest.raises(ModelError, match=words):
        load_model(spec)


def test_invalid_model_dir_is_a_clear_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a model directory"):
        load_model(str(tmp_path))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="hub"):
        load_model("some-org/some-model-that-is-not-cached")


def test_trust_remote_code_is_off_by_default():
    from posttrain.config import EvalConfig, SFTConfig

    assert SFTConfig().trust_remote_code is False and EvalConfig().trust_remote_code is False
