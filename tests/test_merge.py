"""Model merging: the maths by hand (SLERP, TIES sign election, DARE rescaling), whole-model merges checked tensor by
tensor and reloaded in plain transformers, adapters folded before merging, and refusals of what cannot merge."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.errors import ConfigError, ModelError
from posttrain.toolbox.merge import merge_models, merge_tensors, slerp


# --- the maths, by hand ---------------------------------------------------------------------------------------
def test_slerp_ends_give_the_inputs():
    a, b = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([0.5, -1.0, 4.0])
    assert torch.equal(slerp(0.0, a, b), a)
    assert torch.equal(slerp(1.0, a, b), b)


def test_slerp_midpoint_by_hand():
    # Orthogonal directions, norms 2 and 1: θ = π/2, both coefficients sin(π/4)/sin(π/2) = √½, applied to the
    # tensors as they are (mergekit's definition): (2√½, √½).
    out = slerp(0.5, torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert_close(out, torch.tensor([2 * math.sqrt(0.5), math.sqrt(0.5)]))
    # 60° apart, t = 1/4: coefficients sin(45°)/sin(60°) and sin(15°)/sin(60°).
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])
    s0, s1 = math.sin(math.pi / 4) / math.sin(math.pi / 3), math.sin(math.pi / 12) / math.sin(math.pi / 3)
    assert_close(slerp(0.25, v0, v1), s0 * v0 + s1 * v1)
    # The interpolant of two unit vectors stays on the unit circle (linear interpolation would not).
    assert_close(slerp(0.25, v0, v1).norm(), torch.tensor(1.0))


def test_slerp_parallel_and_zero_fall_back_to_linear():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert_close(slerp(0.3, a, 3 * a), 0.7 * a + 0.3 * 3 * a)
    assert_close(slerp(0.3, a, -a), 0.7 * a - 0.3 * a)  # antiparallel: the angle is π, sin π = 0
    assert_close(slerp(0.5, a, torch.zeros(3)), 0.5 * a)


def test_linear_and_task_arithmetic_by_hand():
    x, y = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 6.0])
    assert_close(merge_tensors("linear", [x, y], weights=[3.0, 1.0]), torch.tensor([1.5, 0.0]))
    base = torch.tensor([1.0, 1.0])
    # base + 1·(x - base) + 0.5·(y - base) = (1,1) + (0,-3) + (1, 2.5)
    assert_close(merge_tensors("task_arithmetic", [x, y], base=base, weights=[1.0, 0.5]), torch.tensor([2.0, 0.5]))


def test_ties_sign_election_by_hand():
    t1, t2, t3 = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-3.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, -0.5])
    zero = torch.zeros(3)
    # No trimming: sums (-1, 0, 3.5) elect signs (-, +, +) (a zero sum elects +); agreeing entries averaged:
    # (-3)/1, (1+1)/2, (3+1)/2.
    out = merge_tensors("ties", [t1, t2, t3], base=zero, weights=[1.0, 1.0, 1.0], density=1.0)
    assert_close(out, torch.tensor([-3.0, 1.0, 2.0]))
    # density 2/3 keeps each vector's 2 largest magnitudes: (0,-2,3), (-3,1,0), (1,1,0); sums (-2, 0, 3) elect
    # (-, +, +); agreeing: -3, (1+1)/2, 3.
    out = merge_tensors("ties", [t1, t2, t3], base=zero, weights=[1.0, 1.0, 1.0], density=2 / 3)
    assert_close(out, torch.tensor([-3.0, 1.0, 3.0]))
    # Weights scale the agreeing entries before the mean (peft: divided by the count of agreeing models), and the
    # result sits on the base.
    base = torch.tensor([10.0, 10.0, 10.0])
    out = merge_tensors("ties", [base + t1, base + t2, base + t3], base=base, weights=[2.0, 1.0, 1.0], density=1.0)
    assert_close(out, base + torch.tensor([-3.0, 1.0, (6.0 + 1.0) / 2]))


def test_dare_drops_and_rescales():
    torch.manual_seed(0)
    base, delta = torch.randn(20_000), torch.randn(20_000)
    out = merge_tensors("dare_linear", [base + delta], base=base, weights=[1.0], density=0.25, seed=7)
    kept = (out - base).abs() > 1e-6
    # Kept entries are the task vector / density exactly; dropped ones are the base; ~25% are kept.
    assert_close((out - base)[kept], delta[kept] / 0.25, rtol=1e-4, atol=1e-4)
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    # The seed decides the drops, the global generator is left alone, and density 1 keeps everything.
    state = torch.get_rng_state()
    again = merge_tensors("dare_linear", [base + delta], base=base, weights=[1.0], density=0.25, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(out, again)
    other = merge_tensors("dare_linear", [base + delta], base=base, weights=[1.0], density=0.25, seed=8)
    assert not torch.equal(out, other)
    assert_close(merge_tensors("dare_ties", [base + delta], base=base, weights=[1.0], density=1.0), base + delta)


# --- whole models ---------------------------------------------------------------------------------------------
def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def three(tmp_path_factory, tokenizer):
    """Three random tiny models of one architecture: a 'base' and two 'fine-tunes' near it."""
    from posttrain.models.tiny import build_model

    root = tmp_path_factory.mktemp("merge")
    base = build_model(tokenizer, seed=0)
    paths = [_save(base, tokenizer, root / "base")]
    for seed in (1, 2):
        model = build_model(tokenizer, seed=0)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        paths.append(_save(model, tokenizer, root / f"ft{seed}"))
    return paths


def _state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_linear_merge_of_models_reloads_in_plain_transformers(three, tmp_path):
    base, a, b = three
    record = merge_models("linear", [a, b], tmp_path / "m", weights=[3.0, 1.0])
    merged, sa, sb = _state(tmp_path / "m"), _state(a), _state(b)
    for name in sa:
        assert_close(merged[name], (3 * sa[name] + sb[name]) / 4, msg=name)
    assert json.loads((tmp_path / "m" / "merge.json").read_text()) == record
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_slerp_merge_ends_are_the_inputs(three, tmp_path):
    _, a, b = three
    merge_models("slerp", [a, b], tmp_path / "t0", t=0.0)
    merge_models("slerp", [a, b], tmp_path / "t1", t=1.0)
    m0, m1, sa, sb = _state(tmp_path / "t0"), _state(tmp_path / "t1"), _state(a), _state(b)
    assert all(torch.equal(m0[n], sa[n]) for n in sa)
    assert all(torch.equal(m1[n], sb[n]) for n in sb)


def test_ties_and_dare_merges_act_on_full_weight_task_vectors(three, tmp_path):
    base, a, b = three
    merge_models("ties", [a, b], tmp_path / "ties", base=base, density=0.5)
    merge_models("dare_ties", [a, b], tmp_path / "dare", base=base, density=0.5, seed=3)
    ties, dare, s0, sa, sb = (_state(p) for p in (tmp_path / "ties", tmp_path / "dare", base, a, b))
    name = "model.layers.0.mlp.up_proj.weight"
    expected = merge_tensors("ties", [sa[name], sb[name]], base=s0[name], weights=[1.0, 1.0], density=0.5)
    assert_close(ties[name], expected)
    # DARE at density 0.5: about half of each task vector survives; the merged delta is 0 where both dropped.
    delta = dare[name] - s0[name]
    assert 0.15 < (delta.abs() < 1e-7).float().mean().item() < 0.35  # both dropped: ~1/4
    assert torch.equal(ties["lm_head.weight"], ties["model.embed_tokens.weight"])  # tied stays tied


def test_adapters_merge_on_their_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    adapters, folded = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(model, cfg)
        peft_model.save_pretrained(tmp_path / f"lora{seed}")
        adapters.append(str(tmp_path / f"lora{seed}"))
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters[-1])
        folded.append(reloaded.merge_and_unload().state_dict())
    record = merge_models("task_arithmetic", adapters, tmp_path / "m")  # base: the adapters' own
    assert record["base"] == str(tiny_model_dir)
    merged, s0 = _state(tmp_path / "m"), _state(tiny_model_dir)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(folded[0][name], s0[name])
    assert_close(merged[name], folded[0][name] + folded[1][name] - s0[name])


# --- refusals -------------------------------------------------------------------------------------------------
def test_mismatched_models_are_refused(three, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    base, a, _ = three
    config = LlamaConfig.from_pretrained(a)
    config.num_attention_heads = config.num_key_value_heads = 8  # every tensor keeps its shape
    other = _save(AutoModelForCausalLM.from_config(config), tokenizer, tmp_path / "heads8")
    with pytest.raises(ModelError, match="num_attention_heads"):
        merge_models("linear", [a, other], tmp_path / "x")
    tok = type(tokenizer).from_pretrained(a)
    tok.add_tokens(["<extra>"])
    renamed = _save(AutoModelForCausalLM.from_pretrained(a), tok, tmp_path / "tok")
    with pytest.raises(ModelError, match="different tokenizers"):
        merge_models("linear", [a, renamed], tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("method", "kwargs", "match"),
    [
        ("slerp", {"models": 3}, "exactly two"),
        ("slerp", {"t": 1.5}, "merge.t"),
        ("ties", {"density": 0.0}, "merge.density"),
        ("ties", {"density": 1.2}, "merge.density"),
        ("linear", {"density": 0.5}, "merge.density"),
        ("linear", {"weights": [1.0]}, "merge.weights"),
        ("linear", {"weights": [1.0, -1.0]}, "sum to 0"),
        ("ties", {}, "merge.base"),  # full models: the base cannot be guessed
        ("slerp", {"base": "B"}, "merge.base"),
        ("linear", {"models": 1}, "two or more"),
    ],
)
def test_bad_merge_arguments_are_clear_errors(three, tmp_path, method, kwargs, match):
    base, a, b = three
    models = {1: [a], 2: [a, b], 3: [a, b, base]}[kwargs.pop("models", 2)]
    if kwargs.get("base") == "B":
        kwargs["base"] = base
    with pytest.raises(ConfigError, match=match):
        merge_models(method, models, tmp_path / "x", **kwargs)


def test_merge_cli(three, tmp_path, capsys):
    from posttrain.cli import main

    base, a, b = three
    assert main(["merge", "--method", "dare_linear", "--models", a, b, "--base", base, "--density", "0.5",
                 "--seed", "1", "--out", str(tmp_path / "m")]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "dare_linear" and printed["seed"] == 1
    assert main(["merge", "--method", "slerp", "--models", a, b, base, "--out", str(tmp_path / "y")]) == 2
    assert "exactly two" in capsys.readouterr().err
    assert main(["merge", "--model", base, "--models", a, b, "--method", "linear", "--out", str(tmp_path / "z")]) == 2
    assert "not both" in capsys.readouterr().err


def test_merge_as_a_recipe_stage(three, tmp_path):
    """A recipe's ``type: merge`` stage: @NAME inputs, its output evaluated and handed on; bad keys named."""
    from posttrain.pipeline import plan_recipe, run_recipe

    base, a, b = three
    stages = [
        {"name": "base", "use": base},
        {"name": "a", "use": a},
        {"name": "avg", "type": "merge", "method": "linear", "models": ["@a", b]},
    ]
    recipe = {"evaluate": {"tasks": ["arithmetic"], "limit": 2, "max_new_tokens": 4, "perplexity_data": ""}}
    summary = run_recipe({**recipe, "stages": stages}, out=str(tmp_path / "run"), progress=False)
    merged = summary["stages"][-1]
    assert merged["type"] == "merge" and merged["tool"]["models"] == [a, b]
    assert summary["final_model"] == str(tmp_path / "run" / "avg") and "accuracy" in merged["eval"]
    sa, sb, sm = _state(a), _state(b), _state(tmp_path / "run" / "avg")
    assert_close(sm["model.norm.weight"], (sa["model.norm.weight"] + sb["model.norm.weight"]) / 2)
    bad = [*stages[:2], {"name": "x", "type": "merge", "method": "linear", "models": ["@a", b], "desnity": 0.5}]
    with pytest.raises(ConfigError, match=r"stages\[2\]\(x\)\.desnity: unknown key for a merge stage"):
        plan_recipe({**recipe, "stages": bad}, tmp_path / "run2")
