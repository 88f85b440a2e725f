"""Pruning: the masks by hand (magnitude per matrix, Wanda per output row, 2:4), whole models pruned and reloaded in
plain transformers with the reported sparsity checked against the saved weights, structured pruning checked against
the original model with the removed heads' (channels') output columns zeroed, recovery that keeps zeros at zero, and
clear refusals."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from posttrain.errors import ConfigError, DataError
from posttrain.toolbox.commands import add_prune_parser, run_prune
from posttrain.toolbox.prune import (
    _masked_grad,
    channel_scores,
    check_prune_args,
    collect_input_sumsq,
    group_scores,
    kept_units,
    matrix_mask,
    n_of_m_mask,
    prune_count,
    prune_model,
    unstructured_mask,
)

T, F = True, False
# Two rows of 4 inputs; |W| sorted: 0.5 < 1 < 1.5 < 2 < 3 < 4 < 5 < 6 (no ties).
W = torch.tensor([[4.0, -1.0, 2.0, 0.5], [3.0, 6.0, -5.0, 1.5]])
# Calibration inputs (2 tokens): column norms ||X_j|| = (5, 1, 2, 1), sums of squares (25, 1, 4, 1).
X = torch.tensor([[3.0, 1.0, 2.0, 0.0], [4.0, 0.0, 0.0, 1.0]])


# --- the masks, by hand ---------------------------------------------------------------------------------------
def test_prune_count_rounds_down_without_float_error():
    assert [prune_count(s, 10) for s in (0.0, 0.29, 0.3, 0.7, 0.99)] == [0, 2, 3, 7, 9]
    assert prune_count(0.57, 100) == 57  # 0.57 * 100 = 56.99999999999999 in floats


def test_magnitude_prunes_the_smallest_of_the_whole_matrix():
    # sparsity 0.5 of 8 weights: the 4 smallest |W| (0.5, 1, 1.5, 2) go, wherever they are: row 0 keeps only one
    # weight and row 1 three (the comparison group is the matrix, not the row).
    expected = torch.tensor([[T, F, F, F], [T, T, T, F]])
    assert torch.equal(unstructured_mask("magnitude", W, sparsity=0.5), expected)
    assert torch.equal(matrix_mask(W.abs(), 0.25), torch.tensor([[T, F, T, F], [T, T, T, T]]))
    assert torch.equal(unstructured_mask("magnitude", W, sparsity=0.0), torch.ones(2, 4, dtype=torch.bool))


def test_wanda_scores_by_activation_norm_within_each_row():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
    sumsq = collect_input_sumsq({"l": layer}, lambda: layer(X[None]))["l"]  # (batch, tokens, in) inputs
    assert_close(sumsq, torch.tensor([25.0, 1.0, 4.0, 1.0]))
    assert not layer._forward_pre_hooks  # the hooks are removed
    # Scores |W|·||X_j||: row 0 (20, 1, 4, 0.5), row 1 (15, 6, 10, 1.5). Each row drops its 2 lowest: columns 3
    # and 1 in both rows. Magnitude keeps (1,1) = 6 instead, whose input is small.
    expected = torch.tensor([[T, F, T, F], [T, F, T, F]])
    assert torch.equal(unstructured_mask("wanda", W, sparsity=0.5, input_sumsq=sumsq), expected)
    assert not torch.equal(expected, unstructured_mask("magnitude", W, sparsity=0.5))
    # Compared over the whole matrix instead, the 4 lowest scores (0.5, 1, 1.5, 4) would leave row 1 three weights.
    assert torch.equal(matrix_mask(W.abs() * sumsq.sqrt(), 0.5), torch.tensor([[T, F, F, F], [T, T, T, F]]))


def test_two_four_keeps_the_top_two_of_every_group_of_four():
    row = torch.tensor([[1.0, -3.0, 2.0, 0.5, 4.0, 1.0, -1.5, 2.5]])
    # Groups (1, -3, 2, 0.5) and (4, 1, -1.5, 2.5): keep -3, 2 and 4, 2.5.
    assert torch.equal(unstructured_mask("2:4", row, sparsity=0.5), torch.tensor([[F, T, T, F, T, F, F, T]]))
    # With activations (sums of squares 100 on inputs 0 and 6), Wanda scores: (10, 3, 2, 0.5), (4, 1, 15, 2.5).
    sumsq = torch.tensor([100.0, 1, 1, 1, 1, 1, 100, 1])
    expected = torch.tensor([[T, T, F, F, T, F, T, F]])
    assert torch.equal(unstructured_mask("2:4", row, sparsity=0.5, input_sumsq=sumsq), expected)
    # Against a loop on random scores: exactly 2 kept per group, and they are the group's two largest.
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    mask = n_of_m_mask(scores)
    for r in range(6):
        for g in range(0, 16, 4):
            kept = {g + j for j in range(4) if mask[r, g + j]}
            top = set((g + torch.argsort(scores[r, g : g + 4], descending=True)[:2]).tolist())
            assert kept == top


def test_structured_scores_by_hand():
    # 4 query heads on 2 KV heads, head_dim 1: o_proj (hidden 2, 4 columns); group 0 = query heads 0, 1.
    o = torch.tensor([[1.0, 2.0, 0.0, 1.0], [2.0, 0.0, 0.0, 0.0]])  # group norms sqrt(1+4+4) = 3, sqrt(1) = 1
    v = torch.tensor([[1.0, 0.0], [3.0, 4.0]])  # KV head norms 1, 5
    assert_close(group_scores(o, v, kv_heads=2), torch.tensor([3.0, 5.0]))
    # Activation-aware: the heads' output norm over tokens, sqrt(4 + 5) = 3 and sqrt(16 + 0) = 4.
    assert_close(
        group_scores(o, v, kv_heads=2, o_input_sumsq=torch.tensor([4.0, 5.0, 16.0, 0.0])), torch.tensor([9.0, 4.0])
    )
    gate, up = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]), torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    down = torch.tensor([[1.0, 0.0, 1.0]])
    # ||down col|| · ||gate row|| · ||up row|| = 1·1·2, 0·2·1, 1·5·1.
    assert_close(channel_scores(gate, up, down), torch.tensor([2.0, 0.0, 5.0]))
    assert_close(
        channel_scores(gate, up, down, down_input_sumsq=torch.tensor([9.0, 100.0, 1.0])), torch.tensor([3.0, 0.0, 1.0])
    )
    scores = torch.tensor([0.5, 3.0, 1.0, 2.0])
    assert kept_units(scores, 0.5) == [1, 3]
    assert kept_units(scores, 0.2) == [0, 1, 2, 3]  # floor(0.8) = 0 removed
    assert kept_units(scores, 0.99) == [1]  # floor(3.96) = 3 removed
    assert kept_units(torch.tensor([2.0]), 0.9) == [0]  # at least one kept


def test_masked_gradient_keeps_zeros_through_adamw_with_weight_decay():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    mask = matrix_mask(layer.weight.detach().abs(), 0.5)
    with torch.no_grad():
        layer.weight.mul_(mask)
    start = layer.weight.detach().clone()
    handle = layer.weight.register_hook(_masked_grad(mask))
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        layer(torch.randn(5, 8)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    handle.remove()
    assert torch.equal(layer.weight[~mask], torch.zeros(int((~mask).sum())))  # exactly zero
    assert (layer.weight[mask] != start[mask]).all()


# --- whole models ---------------------------------------------------------------------------------------------
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LINEARS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _zero_fraction(tensor):
    return int((tensor == 0).sum()) / tensor.numel()


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    """16 prompt/completion rows (calibration and recovery data that loads in no time)."""
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    rows = [{"prompt": f"What is {a} + {a + 3}?", "completion": f"Answer: {2 * a + 3}"} for a in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory, tokenizer):
    """A random Llama with grouped-query attention (4 query heads on 2 KV heads) and biases everywhere."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("gqa")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_prune_parser(parser.add_subparsers(dest="command"))
    run_prune(parser.parse_args(["prune", *argv]))


def test_magnitude_cli_output_reloads_and_reports_its_sparsity(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "p"
    _cli(["--model", str(tiny_model_dir), "--out", str(out), "--method", "magnitude", "--sparsity", "0.5"])
    record = json.loads(capsys.readouterr().out)
    assert json.loads((out / "prune.json").read_text()) == record
    before, after = _state(tiny_model_dir), _state(out)  # plain transformers
    names = {f"model.layers.{i}.{n}" for i in range(4) for n in LINEARS}
    assert set(record["layer_sparsity"]) == names  # decoder linears only: no embeddings, no output head
    for name in names:
        w, w0 = after[f"{name}.weight"], before[f"{name}.weight"]
        assert record["layer_sparsity"][name] == _zero_fraction(w) == 0.5
        # The zeros are the half of smallest |w| in the matrix (the median splits them: no ties in random floats).
        small = w0.abs() <= w0.abs().flatten().kthvalue(w0.numel() // 2).values
        assert torch.equal(w, torch.where(small, 0.0, w0))
    for name in before:
        if name.removesuffix(".weight") not in names:
            assert torch.equal(after[name], before[name]), name
    assert record["overall_sparsity"] == 0.5
    assert record["parameters_before"] == record["parameters_after"]


def test_wanda_and_two_four_reach_their_pattern_in_the_saved_weights(tiny_model_dir, tmp_path):
    wanda = prune_model(
        str(tiny_model_dir),
        tmp_path / "w",
        method="wanda",
        sparsity=0.25,
        calibration="task:arithmetic",
        calibration_rows=4,
    )
    assert wanda["calibration_rows"] == 4
    prune_model(str(tiny_model_dir), tmp_path / "m", method="magnitude", sparsity=0.25)
    w_state, m_state = _state(tmp_path / "w"), _state(tmp_path / "m")
    for name, reported in wanda["layer_sparsity"].items():
        w = w_state[f"{name}.weight"]
        assert reported == _zero_fraction(w) == 0.25
        assert ((w == 0).sum(dim=1) == w.shape[1] // 4).all()  # per output row: a quarter of each row
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(w_state[name] == 0, m_state[name] == 0)  # the activations changed the choice
    record = prune_model(
        str(tiny_model_dir), tmp_path / "s", method="2:4", calibration="task:arithmetic", calibration_rows=2
    )
    state = _state(tmp_path / "s")
    for name, reported in record["layer_sparsity"].items():
        w = state[f"{name}.weight"]
        assert reported == _zero_fraction(w) == 0.5
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()


def _logits(model, tokenizer):
    ids = torch.tensor([tokenizer("What is 12 + 7? Answer: 19")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    ("which", "structured", "method"),
    [("tiny", "heads", "wanda"), ("gqa", "heads", "magnitude"), ("tiny", "mlp", "magnitude"), ("gqa", "mlp", "wanda")],
)
def test_structured_pruning_equals_the_original_with_those_columns_zeroed(
    which, structured, method, tiny_model_dir, gqa_dir, rows_file, tokenizer, tmp_path
):
    """A removed head's attention output only reaches the residual stream through its o_proj columns (a channel's
    activation through its down_proj column); heads are independent before o_proj, and a query head's KV head
    goes with it. So the smaller model computes exactly the original with those columns set to zero."""
    from transformers import AutoModelForCausalLM

    source = str(tiny_model_dir if which == "tiny" else gqa_dir)
    calibration = {"calibration": rows_file, "calibration_rows": 4} if method == "wanda" else {}
    record = prune_model(source, tmp_path / "p", method=method, sparsity=0.5, structured=structured, **calibration)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    zeroed = AutoModelForCausalLM.from_pretrained(source)
    config, original = pruned.config, zeroed.config
    head_dim = original.hidden_size // original.num_attention_heads
    for i, layer in enumerate(zeroed.model.layers):
        kept = record["kept"][f"model.layers.{i}"]
        with torch.no_grad():
            if structured == "heads":
                for h in set(range(original.num_attention_heads)) - set(kept):
                    layer.self_attn.o_proj.weight[:, h * head_dim : (h + 1) * head_dim] = 0
            else:
                layer.mlp.down_proj.weight[:, sorted(set(range(original.intermediate_size)) - set(kept))] = 0
    assert_close(_logits(pruned, tokenizer), _logits(zeroed, tokenizer), atol=1e-5, rtol=1e-5)
    # Half the units gone in every layer, the config says so, and the model is smaller.
    if structured == "heads":
        assert (config.num_attention_heads, config.num_key_value_heads) == (
            original.num_attention_heads // 2,
            original.num_key_value_heads // 2,
        )
        assert config.head_dim == head_dim and all(
            len(k) == original.num_attention_heads // 2 for k in record["kept"].values()
        )
        assert record["layer_removed"]["model.layers.0.self_attn.o_proj"] == 0.5
    else:
        assert config.intermediate_size == original.intermediate_size // 2
        assert record["layer_removed"]["model.layers.0.mlp.up_proj"] == 0.5
    assert record["parameters_after"] == sum(p.numel() for p in pruned.parameters()) < record["parameters_before"]
    assert record["kept"] == _expected_kept(source, structured, method, rows_file, tokenizer)
    if which == "gqa" and structured == "heads":  # whole KV groups: query heads (0, 1) or (2, 3)
        assert all(k in ([0, 1], [2, 3]) for k in record["kept"].values())


def _expected_kept(source, structured, method, rows_file, tokenizer):
    """The units each layer keeps (the top half), scored in the test's own words: the norm of the unit's output
    weights (o_proj columns of a KV group's query heads; a down_proj column) times, for magnitude, the norm of its
    input weights (the KV head's v_proj rows; gate and up rows) or, for wanda, the norm of what the unit feeds into
    those output weights over the first 4 calibration rows (captured here with a forward hook)."""
    from transformers import AutoModelForCausalLM

    from posttrain.data.prepare import prepare_examples

    model = AutoModelForCausalLM.from_pretrained(source)
    c = model.config
    head_dim, group = c.hidden_size // c.num_attention_heads, c.num_attention_heads // c.num_key_value_heads
    outs = [layer.self_attn.o_proj if structured == "heads" else layer.mlp.down_proj for layer in model.model.layers]
    seen = {i: [] for i in range(len(outs))}
    if method == "wanda":
        rows = [json.loads(line) for line in open(rows_file).read().splitlines()[:4]]
        examples = prepare_examples(
            rows, tokenizer, kind="sft", max_length=256, length_policy="truncate", completion_only=False
        ).examples
        hooks = [o.register_forward_hook(lambda m, a, r, i=i: seen[i].append(a[0][0])) for i, o in enumerate(outs)]
        with torch.no_grad():
            for example in examples:
                model(input_ids=torch.tensor([example.input_ids]))
        for hook in hooks:
            hook.remove()
    kept = {}
    for i, layer in enumerate(model.model.layers):
        w = outs[i].weight.detach()
        acts = torch.cat(seen[i]) if seen[i] else None
        if structured == "heads":
            cols = [list(range(g * group * head_dim, (g + 1) * group * head_dim)) for g in range(c.num_key_value_heads)]
            v = layer.self_attn.v_proj.weight.detach()
            if acts is not None:
                inputs = [acts[:, k].norm() for k in cols]
            else:
                inputs = [v[g * head_dim : (g + 1) * head_dim].norm() for g in range(len(cols))]
            scores = torch.stack([w[:, k].norm() * x for k, x in zip(cols, inputs)])
        else:
            mlp = layer.mlp
            weights = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1)
            inputs = acts.norm(dim=0) if acts is not None else weights
            scores = w.norm(dim=0) * inputs.detach()
        top = sorted(torch.argsort(scores, descending=True)[: len(scores) // 2].tolist())
        units = [g * group + j for g in top for j in range(group)] if structured == "heads" else top
        kept[f"model.layers.{i}"] = units
    return kept


def test_recovery_keeps_pruned_weights_at_exactly_zero(tiny_model_dir, rows_file, tmp_path):
    plain = prune_model(str(tiny_model_dir), tmp_path / "a", method="magnitude", sparsity=0.5)
    record = prune_model(
        str(tiny_model_dir),
        tmp_path / "b",
        method="magnitude",
        sparsity=0.5,
        recover_steps=3,
        recover_data=rows_file,
        recover_lr=1e-2,
        max_length=64,
    )
    assert record["recovery"]["steps"] == 3 and record["recovery"]["data"] == rows_file
    assert record["layer_sparsity"] == plain["layer_sparsity"]
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    for name in record["layer_sparsity"]:
        wa, wb = a[f"{name}.weight"], b[f"{name}.weight"]
        assert torch.equal(wa == 0, wb == 0), name  # the same zeros, still exactly zero
        assert (wa[wa != 0] != wb[wb != 0]).float().mean() > 0.5, name  # the kept weights trained
    assert len((tmp_path / "b" / "recover_metrics.jsonl").read_text().splitlines()) >= 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the run dir was removed


def test_an_adapter_is_folded_before_pruning(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "lora")
    folded = peft_model.merge_and_unload().state_dict()
    prune_model(str(tmp_path / "lora"), tmp_path / "p", method="magnitude", sparsity=0.5)
    name = "model.layers.0.self_attn.q_proj.weight"
    w0 = folded[name]
    expected = torch.where(w0.abs() <= w0.abs().flatten().kthvalue(w0.numel() // 2).values, 0.0, w0)
    assert_close(_state(tmp_path / "p")[name], expected)


# --- refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "sparsity", "kwargs", "match"),
    [
        ("magnitude", 1.0, {}, "prune.sparsity: 1.0 is outside"),
        ("magnitude", -0.1, {}, "prune.sparsity: -0.1 is outside"),
        ("magnitude", float("nan"), {}, "prune.sparsity"),
        ("magnitude", None, {}, "prune.sparsity: give"),
        ("wanda", 0.5, {}, "prune.calibration: wanda .* needs calibration rows"),
        ("2:4", 0.3, {}, "prune.sparsity: 2:4 .* 0.5 by definition"),
        ("2:4", 0.5, {"structured": "heads"}, "prune.structured"),
        ("magnitude", 0.5, {"calibration": "task:arithmetic"}, "prune.calibration: magnitude"),
        ("magnitude", 0.5, {"calibration_rows": 0}, "prune.calibration_rows"),
        ("magnitude", 0.5, {"recover_steps": -1}, "prune.recover_steps"),
        ("magnitude", 0.5, {"recover_data": "task:arithmetic"}, "prune.recover_data"),
        ("random", 0.5, {}, "prune.method"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, method, sparsity, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        prune_model("builtin:tiny-base", tmp_path / "x", method=method, sparsity=sparsity, **kwargs)
    assert not (tmp_path / "x").exists()
    assert check_prune_args("2:4", None) == 0.5


def test_missing_calibration_data_and_a_used_out_are_clear_errors(tiny_model_dir, tmp_path):
    with pytest.raises(DataError, match="no-such.jsonl: no such file"):
        prune_model(str(tiny_model_dir), tmp_path / "x", method="wanda", sparsity=0.5, calibration="no-such.jsonl")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="prune.out: .* not empty"):
        _cli(["--model", str(tiny_model_dir), "--out", str(tmp_path / "used"), "--sparsity", "0.5"])
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"


def test_structured_on_an_unknown_layout_is_refused_but_unstructured_works(tokenizer, tmp_path):
    """Phi-3 fuses q/k/v and gate/up into one layer: unstructured pruning finds its linears generically, head or
    channel removal is refused."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    Phi3ForCausalLM(config).save_pretrained(tmp_path / "phi3")
    tokenizer.save_pretrained(tmp_path / "phi3")
    with pytest.raises(ConfigError, match="prune.structured: .* this model is 'phi3'"):
        prune_model(str(tmp_path / "phi3"), tmp_path / "h", method="magnitude", sparsity=0.5, structured="heads")
    record = prune_model(str(tmp_path / "phi3"), tmp_path / "u", method="magnitude", sparsity=0.5)
    assert sorted(record["layer_sparsity"]) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.mlp.gate_up_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.self_attn.qkv_proj",
    ]
    state = _state(tmp_path / "u")
    assert all(_zero_fraction(state[f"{n}.weight"]) == 0.5 for n in record["layer_sparsity"])


def test_compress_recipe_runs_each_tool_and_reports_size(tmp_path, tiny_model_dir):
    """recipes/compress.yaml cut short, on a saved tiny model as the original: every variant is evaluated; the
    structured and quantized variants are smaller on disk, unstructured ones are not (zeros stored dense)."""
    from posttrain.pipeline import RECIPES, load_recipe, run_recipe

    cut = ["distilled.max_steps=1", "distilled.batch_size=2", "distilled.max_new_tokens=4"]
    small = [
        "evaluate.limit=2",
        "evaluate.max_new_tokens=4",
        "evaluate.tasks=[arithmetic]",
        "evaluate.perplexity_data=",
    ]
    calib = [f"{name}.calibration_rows=4" for name in ("wanda30", "wanda50", "mlp25")]
    recipe = load_recipe(RECIPES / "compress.yaml", [f"original.use={tiny_model_dir}", *cut, *small, *calib])
    summary = run_recipe(recipe, out=str(tmp_path / "run"), progress=False)
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["original", "base", "merged", "distilled", "wanda30", "wanda50", "mlp25", "int8", "int4"]
    assert stages["wanda50"]["tool"]["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    size = {name: s["eval"]["size_mb"] for name, s in stages.items()}
    assert size["wanda50"] == pytest.approx(size["original"], rel=0.01) and size["mlp25"] < 0.9 * size["original"]
    assert stages["mlp25"]["eval"]["params"] < stages["original"]["eval"]["params"]
    assert size["int4"] < size["int8"] < 0.5 * size["original"]  # the tiny model's embeddings stay in float32
    assert stages["int4"]["eval"]["params"] == stages["int8"]["eval"]["params"] == stages["original"]["eval"]["params"]
