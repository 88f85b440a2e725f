"""Quantization: the saved codes against the formats by hand (int8: a symmetric scale per output row; NF4: the
paper's 16 levels, one absmax per 64 weights), reloaded with plain transformers and through ``load_model`` into
eval and generate; adapters folded first; the sizes on disk; and clear refusals (an already quantized model, a
missing library, training or merging a quantized model)."""

from __future__ import annotations

import argparse
import json
from importlib import metadata

import pytest
import torch
from torch.testing import assert_close

from posttrain.errors import ConfigError, ModelError
from posttrain.toolbox.commands import add_quantize_parser, run_quantize
from posttrain.toolbox.quantize import check_quantize_args, quantize_model, quantized_layers

# NormalFloat4 levels, as printed in Dettmers et al. 2023 (QLoRA), appendix E
NF4 = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]
)  # fmt: skip
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _int8_by_hand(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1, keepdim=True) / 127.5
    return torch.clamp(torch.round(w * (1 / scale)), -128, 127), scale


def _nf4_by_hand(w: torch.Tensor) -> torch.Tensor:
    blocks = w.flatten().view(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    nearest = (blocks / absmax).unsqueeze(-1).sub(NF4).abs().argmin(dim=-1)
    return (NF4[nearest] * absmax).view_as(w)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="posttrain")
    add_quantize_parser(parser.add_subparsers(dest="command"))
    run_quantize(parser.parse_args(["quantize", *argv]))


def test_int8_codes_and_scales_are_the_symmetric_per_row_format(tiny_model_dir, tmp_path, capsys):
    _cli(["--model", str(tiny_model_dir), "--method", "int8", "--out", str(tmp_path / "q8")])
    record = json.loads(capsys.readouterr().out)
    original, quantized = _plain(tiny_model_dir), _plain(tmp_path / "q8")
    layers = quantized_layers(quantized)
    assert len(layers) == record["layers_quantized"] == 4 * len(LINEARS)
    for name in layers:
        weight = quantized.get_submodule(name).weight
        codes, scale = _int8_by_hand(original.get_submodule(name).weight.detach())
        assert torch.equal(weight.qdata.float(), codes), name
        assert_close(weight.scale.view(-1, 1), scale, rtol=0, atol=0)
    # the embeddings, norms and (tied) output head are the original's, bit for bit
    assert torch.equal(quantized.lm_head.weight, original.lm_head.weight)
    assert torch.equal(quantized.model.norm.weight, original.model.norm.weight)
    assert record["kept_full_precision"] == ["lm_head"]
    saved = (tmp_path / "q8" / "model.safetensors").stat().st_size
    assert (
        record["bytes_after"] == saved
        and record["bytes_before"] == (tiny_model_dir / "model.safetensors").stat().st_size
    )
    assert json.loads((tmp_path / "q8" / "quantize.json").read_text()) == record


def test_int4_nf4_dequantizes_to_the_nearest_level_times_the_block_absmax(tiny_model_dir, tmp_path):
    import bitsandbytes.functional as bnbf

    record = quantize_model(str(tiny_model_dir), tmp_path / "q4", method="int4")
    original, quantized = _plain(tiny_model_dir), _plain(tmp_path / "q4")
    assert record["library"] == "bitsandbytes" and record["format"].startswith("nf4")
    for name in quantized_layers(quantized):
        weight = quantized.get_submodule(name).weight
        assert weight.quant_state.blocksize == 64 and weight.quant_state.quant_type == "nf4"
        dequantized = bnbf.dequantize_4bit(weight.data, weight.quant_state)
        assert_close(dequantized, _nf4_by_hand(original.get_submodule(name).weight.detach()), rtol=1e-6, atol=1e-7)
    # two codes per byte plus a float32 absmax per 64 weights: 4.5 bits where float32 had 32
    linear_params = sum(original.get_submodule(n).weight.numel() for n in quantized_layers(quantized))
    assert record["bytes_before"] - record["bytes_after"] == pytest.approx(linear_params * (4 - 4.5 / 8), rel=0.01)


def test_quantized_models_load_for_eval_and_generate_and_count_full_parameters(tmp_path, capsys):
    from posttrain.cli import main
    from posttrain.config import EvalConfig
    from posttrain.eval.harness import evaluate_model
    from posttrain.models.loading import load_model, parameter_count

    quantize_model("builtin:tiny-base", tmp_path / "q8", method="int8")
    quantize_model("builtin:tiny-base", tmp_path / "q4", method="int4")
    full, _ = load_model("builtin:tiny-base")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for name in ("q8", "q4"):
        model, tokenizer = load_model(str(tmp_path / name))
        assert parameter_count(model) == parameter_count(full) == 1_062_912  # not the 4-bit packed count
        with torch.no_grad():
            assert torch.equal(model(ids).logits, _plain(tmp_path / name)(ids).logits)  # the same model either way
        cfg = EvalConfig(model=str(tmp_path / name), task="arithmetic", limit=4, max_new_tokens=8)
        assert evaluate_model(model, tokenizer, cfg)["rows"] == 4
        capsys.readouterr()
        assert main(["generate", "--model", str(tmp_path / name), "--prompt", "2+2=", "--max-new-tokens", "4"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["completions"][0]


def test_an_adapter_is_folded_before_quantizing(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(
        _plain(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "lora")
    folded = peft_model.merge_and_unload().model.layers[0].self_attn.q_proj.weight.detach()
    quantize_model(str(tmp_path / "lora"), tmp_path / "q8", method="int8")
    codes, _ = _int8_by_hand(folded)
    assert torch.equal(_plain(tmp_path / "q8").model.layers[0].self_attn.q_proj.weight.qdata.float(), codes)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the folded copy was removed


# --- refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "kwargs", "match"),
    [
        ("int3", {}, "quantize.method: unknown method 'int3'"),
        ("int4", {"int4_type": "int4"}, "quantize.int4_type: unknown 'int4'"),
        ("int8", {"double_quant": True}, "options of --method int4 only"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, method, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        quantize_model("builtin:tiny-base", tmp_path / "x", method=method, **kwargs)
    assert not (tmp_path / "x").exists()
    check_quantize_args("int4", int4_type="fp4", double_quant=True)


def test_a_quantized_model_is_refused_by_quantize_prune_merge_and_training(tmp_path, capsys):
    from posttrain.cli import main
    from posttrain.toolbox.merge import merge_models
    from posttrain.toolbox.prune import prune_model

    quantize_model("builtin:tiny-base", tmp_path / "q8", method="int8")
    q8 = str(tmp_path / "q8")
    with pytest.raises(ModelError, match="already quantized .torchao.; quantize the full-precision model"):
        quantize_model(q8, tmp_path / "again", method="int4")
    with pytest.raises(ModelError, match="a quantized model; the tools work on full-precision weights"):
        prune_model(q8, tmp_path / "p", method="magnitude", sparsity=0.5)
    with pytest.raises(ModelError, match="a quantized model"):
        merge_models("linear", ["builtin:tiny-base", q8], tmp_path / "m")
    capsys.readouterr()
    argv = ["sft", "--model", q8, "--data", "task:arithmetic", "--max-steps", "1", "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    assert "is quantized (torchao); training needs full-precision weights" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("again", "p", "m"))


def test_a_missing_library_is_a_clear_error_for_quantize_and_load(tmp_path, monkeypatch):
    from posttrain.models.loading import load_model

    quantize_model("builtin:tiny-base", tmp_path / "q4", method="int4")
    real = metadata.version

    def version(package):
        if package in ("torchao", "bitsandbytes"):
            raise metadata.PackageNotFoundError(package)
        return real(package)

    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(ModelError, match=r"int8 quantization needs torchao: pip install 'posttrain\[quantize\]'"):
        quantize_model("builtin:tiny-base", tmp_path / "q8", method="int8")
    with pytest.raises(ModelError, match="quantized with bitsandbytes; loading it needs bitsandbytes"):
        load_model(str(tmp_path / "q4"))


def test_a_recipe_quantize_stage_checks_its_keys(tmp_path):
    from posttrain.toolbox.steps import tool_step

    step = tool_step({"name": "q", "type": "quantize", "method": "int4"}, index=2, out=tmp_path, previous_model="M")
    assert step.kwargs == {"model_spec": "M", "method": "int4", "out": str(tmp_path / "q")}
    with pytest.raises(ConfigError, match=r"stages\[2\]\(q\).bits: unknown key for a quantize stage"):
        tool_step({"name": "q", "type": "quantize", "bits": 4}, index=2, out=tmp_path, previous_model="M")
    with pytest.raises(ConfigError, match=r"stages\[2\]\(q\): a quantize stage needs method"):
        tool_step({"name": "q", "type": "quantize"}, index=2, out=tmp_path, previous_model="M")
