"""Rollout engines behind one interface: the factory, weight updates into a separate rollout copy, the vLLM
engine's errors and output mapping (CPU, with a stand-in for vLLM), search and eval generating through the
interface, and on a GPU with vLLM installed, vLLM against the hf engine."""

from __future__ import annotations

import copy
import sys
from types import SimpleNamespace

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.rollout import HFEngine, Rollouts, SamplingParams, make_engine, vllm_engine
from posttrain.rollout import factory as factory_module
from posttrain.rollout.vllm_engine import VLLMEngine, hf_weights, request_seeds, to_rollouts

QUESTIONS = ["What is 12 + 345?", "Write in capitals: kettle", "Ann has 7 pens."]
GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)


@pytest.fixture(scope="module")
def base():
    from posttrain.models.loading import load_model

    return load_model("builtin:tiny-base")


@pytest.fixture(scope="module")
def other_weights(base):
    """Weights of another model with the same architecture: a random tiny model (what "the trainer stepped"
    looks like, and far enough from the base that greedy outputs change)."""
    from posttrain.models.tiny import build_model

    return {k: v.clone() for k, v in build_model(base[1], seed=0).state_dict().items()}


def prompts(tok, questions=QUESTIONS):
    return [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]


def same_rollouts(a: Rollouts, b: Rollouts) -> bool:
    return a.texts == b.texts and torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logps, b.logps)


# ------------------------------------------------------------------------------------------------------ factory


def test_factory_hf_samples_the_model_itself_or_a_separate_copy(base):
    model, tok = base
    own = make_engine("hf", model, tok)
    assert isinstance(own, HFEngine) and own.model is model and own.decoding_model("x") is model
    bf16 = make_engine("hf", model, tok, dtype="bfloat16")
    assert bf16.model is not model and next(bf16.model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in bf16.model.parameters()) and not bf16.model.training
    same = make_engine("hf", model, tok, dtype="float32")
    assert same.model is model  # already float32: no copy
    twin = make_engine("hf", model, tok, copy=True, share_prefill=False)
    assert twin.model is not model and not twin.share_prefill
    assert next(twin.model.parameters()).dtype == torch.float32


def test_factory_errors_name_the_config_key(base):
    model, tok = base
    with pytest.raises(ConfigError, match=r"^rollout_engine: unknown engine 'sglang' \(choose one of hf, vllm\)"):
        make_engine("sglang", model, tok)
    with pytest.raises(ConfigError, match=r"^rollout_dtype: unknown dtype 'fp8'"):
        make_engine("hf", model, tok, dtype="fp8")
    with pytest.raises(ConfigError, match=r"^rollout_engine: the hf engine has no option 'gpu_memory_utilization'"):
        make_engine("hf", model, tok, gpu_memory_utilization=0.5)
    with pytest.raises(ConfigError, match=r"^rollout_engine: the vllm engine has no option 'share_prefill'"):
        make_engine("vllm", model, tok, share_prefill=False)  # checked before vLLM's availability


# ----------------------------------------------------------------------------------------------- weight updates


def test_update_weights_makes_a_bf16_copy_follow_the_trained_model(base, other_weights):
    model, tok = copy.deepcopy(base[0]), base[1]
    engine = make_engine("hf", model, tok, dtype="bfloat16")
    before = engine.generate(prompts(tok), GREEDY, seed=0)
    model.load_state_dict(other_weights)  # the trainer's optimiser step, in one big jump
    stale = engine.generate(prompts(tok), GREEDY, seed=0)
    assert same_rollouts(stale, before)  # the copy does not see the new weights until told
    engine.update_weights(model)
    fresh = make_engine("hf", model, tok, dtype="bfloat16").generate(prompts(tok), GREEDY, seed=0)
    after = engine.generate(prompts(tok), GREEDY, seed=0)
    assert after.texts != before.texts
    assert same_rollouts(after, fresh)  # bit-identical to a bf16 copy made from the new weights
    for (name, p), q in zip(engine.model.named_parameters(), model.parameters()):
        assert torch.equal(p, q.to(torch.bfloat16)), name


def test_update_weights_accepts_a_state_dict_of_full_tensors(base, other_weights):
    model, tok = base
    engine = make_engine("hf", model, tok, dtype="bfloat16")
    engine.update_weights(other_weights)  # what an FSDP trainer hands over: gathered full fp32 tensors by name
    reference = copy.deepcopy(model)
    reference.load_state_dict(other_weights)
    fresh = make_engine("hf", reference, tok, dtype="bfloat16").generate(prompts(tok), GREEDY, seed=0)
    assert same_rollouts(engine.generate(prompts(tok), GREEDY, seed=0), fresh)
    # A partial state dict (say, only the trainable tensors) updates just those; a foreign name is an error.
    name = "model.norm.weight"
    engine.update_weights({name: torch.full_like(model.state_dict()[name], 2.0)})
    assert (dict(engine.model.named_parameters())[name] == 2.0).all()
    with pytest.raises(KeyError, match="does not have"):
        engine.update_weights({"value_head.weight": torch.zeros(1)})


def test_update_weights_is_a_noop_when_the_engine_samples_the_trained_model(base, monkeypatch):
    model, tok = base
    engine = make_engine("hf", model, tok)
    monkeypatch.setattr("posttrain.rollout.engine.load_weights", lambda *a: pytest.fail("copied weights"))
    engine.update_weights(model)


# ------------------------------------------------------------------------------------------- vLLM without a GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the CPU-only error cannot occur")
def test_vllm_without_a_gpu_is_a_clear_config_error(base):
    model, tok = base
    with pytest.raises(ConfigError) as err:
        make_engine("vllm", model, tok, dtype="bfloat16", copy=True)  # what a trainer under FSDP2 asks for
    message = str(err.value)
    assert message.startswith("rollout_engine: vllm cannot run here: it needs an NVIDIA GPU")
    assert 'pip install "posttrain[vllm]"' in message and "use hf" in message
    assert "vllm" not in sys.modules  # the failed choice imported nothing from vLLM


def test_vllm_unavailable_names_each_missing_piece(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(factory_module.importlib.util, "find_spec", lambda name: None)
    assert factory_module.vllm_unavailable() == "the vllm package is not installed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert factory_module.vllm_unavailable().endswith("sees none and the vllm package is not installed")


def test_vllm_engine_refuses_beam_and_tree_search():
    from posttrain.search import SearchSpec
    from posttrain.search.strategies import check_spec

    engine = object.__new__(VLLMEngine)  # no vLLM needed to ask
    with pytest.raises(ConfigError, match="^search.strategy: .*use the hf engine"):
        engine.decoding_model("search.strategy")
    for strategy in ("beam", "tree"):
        with pytest.raises(ConfigError, match=f"^search.strategy: {strategy} search .*use the hf engine"):
            check_spec(SearchSpec(strategy=strategy, n=2, engine="vllm"))
    with pytest.raises(ConfigError, match="^search.engine: unknown engine 'tgi'"):
        check_spec(SearchSpec(engine="tgi"))


class FakeLLM:
    """Stands in for ``vllm.LLM``: returns canned request outputs and records weight loads."""

    def __init__(self, outputs):
        self.outputs, self.requests, self.loaded, self.resets = outputs, None, [], 0

    def generate(self, prompts, params, use_tqdm):
        self.requests = (prompts, params)
        return self.outputs

    def apply_model(self, fn):
        return [fn(SimpleNamespace(load_weights=self.loaded.extend))]

    def reset_prefix_cache(self):
        self.resets += 1


def sample(index, tokens, logps, reason):
    positions = [{t: SimpleNamespace(logprob=lp)} for t, lp in zip(tokens, logps)]
    return SimpleNamespace(index=index, token_ids=tokens, logprobs=positions, finish_reason=reason)


def test_vllm_engine_maps_outputs_to_rollouts_and_loads_weights(base, monkeypatch):
    model, tok = base
    monkeypatch.setattr(vllm_engine, "vllm_params", lambda params, seed: (params, seed))
    eos = tok.eos_token_id
    d, o, g = tok.convert_tokens_to_ids(["D", "O", "G"])
    outputs = [
        SimpleNamespace(
            outputs=[sample(1, [o, d], [-0.5, -0.25], "length"), sample(0, [d, o, g, eos], [-1.0] * 4, "stop")]
        ),
        SimpleNamespace(outputs=[sample(0, [g], [-2.0], "length"), sample(1, [eos], [-0.125], "stop")]),
    ]
    engine = object.__new__(VLLMEngine)
    engine.tokenizer, engine.device, engine.llm = tok, torch.device("cpu"), FakeLLM(outputs)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=4)
    out = engine.generate(["dog?", "g?"], params, seed=5)
    sent_prompts, sent_params = engine.llm.requests
    assert sent_prompts == [
        {"prompt_token_ids": tok("dog?", add_special_tokens=False)["input_ids"]},
        {"prompt_token_ids": tok("g?", add_special_tokens=False)["input_ids"]},
    ]
    assert [s for _, s in sent_params] == request_seeds(5, 2, 2)
    # Samples in index order, prompt-major; EOS kept in the mask; padded with pad id and log-prob 0.
    assert out.prompt_index == [0, 0, 1, 1]
    assert out.texts == ["DOG", "OD", "G", ""] and out.finish_reasons == ["stop", "length", "length", "stop"]
    assert out.lengths.tolist() == [4, 2, 1, 1]
    assert out.completion_ids[0].tolist() == [d, o, g, eos] and out.completion_ids[1, 2:].tolist() == [0, 0]
    torch.testing.assert_close(out.logps[1], torch.tensor([-0.5, -0.25, 0.0, 0.0]))
    assert out.forward_passes == 4
    # Weight updates: HF names and full tensors go to the vLLM model's load_weights; the prefix cache is reset.
    engine.update_weights(model)
    assert [n for n, _ in engine.llm.loaded] == [n for n, _ in model.named_parameters()]
    assert engine.llm.resets == 1
    engine.update_weights({"model.norm.weight": torch.ones(3)})
    assert engine.llm.loaded[-1][0] == "model.norm.weight" and engine.llm.resets == 2


def test_request_seeds_never_collide_within_a_call_and_per_prompt_seeds_stand_alone():
    seeds = {s + i for s in request_seeds(7, 50, 4) for i in range(4)}  # vLLM seeds sample i of a request s + i
    assert len(seeds) == 200
    assert request_seeds(7, 1, 4) != request_seeds(8, 1, 4)
    own = request_seeds([3, 4, 5], 3, 4)
    assert len({s + i for s in own for i in range(4)}) == 12
    assert request_seeds([4], 1, 4) == own[1:2]  # a prompt's request seed depends on its own seed only
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        request_seeds([1, 2], 3, 4)


def test_lora_weights_reach_vllm_merged_under_plain_hf_names(base):
    from posttrain.models.lora import add_lora

    model = add_lora(copy.deepcopy(base[0]), rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    merged = copy.deepcopy(model).merge_and_unload()
    adapter_before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    with hf_weights(model) as weights:
        weights = {n: t.clone() for n, t in weights}
    assert weights.keys() == dict(merged.named_parameters()).keys()
    for name, p in merged.named_parameters():
        torch.testing.assert_close(weights[name], p, rtol=0, atol=1e-6)
    for name, p in model.named_parameters():  # the adapters are unmerged again afterwards
        if "lora_" not in name:
            torch.testing.assert_close(p, adapter_before[name], rtol=0, atol=1e-6)


def test_to_rollouts_with_no_tokens_at_all(tokenizer):
    out = to_rollouts([[5]], 1, [[]], [[]], ["length"], tokenizer, torch.device("cpu"))
    assert out.completion_ids.shape == (1, 0) and out.texts == [""] and out.forward_passes == 1


# ------------------------------------------------------------------- search and eval generate through the engine


class RecordingEngine:
    """Wraps an engine and records what it was asked."""

    def __init__(self, inner):
        self.inner, self.tokenizer, self.calls, self.decoding = inner, inner.tokenizer, [], []

    def generate(self, prompts, params, *, seed):
        self.calls.append((list(prompts), params, seed))
        return self.inner.generate(prompts, params, seed=seed)

    def update_weights(self, source):
        self.inner.update_weights(source)

    def decoding_model(self, purpose):
        self.decoding.append(purpose)
        return self.inner.decoding_model(purpose)


def test_search_generates_through_the_engine_it_is_given_or_the_factory_makes(base, monkeypatch):
    from posttrain.search import SearchSpec, search

    model, tok = base
    rows = [{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS[:2]]
    spec = SearchSpec(strategy="best_of_n", n=3, max_new_tokens=12)
    engine = RecordingEngine(HFEngine(model, tok))
    given = search(model, tok, rows, spec, engine=engine)
    assert len(engine.calls) == 1 and engine.calls[0][1].n == 3
    made = []
    real = factory_module.make_engine

    def spy(kind, *args, **kw):
        made.append(kind)
        return real(kind, *args, **kw)

    monkeypatch.setattr(factory_module, "make_engine", spy)
    default = search(model, tok, rows, spec)
    assert made == ["hf"]
    assert [r.completion for r in default] == [r.completion for r in given]
    for strategy in ("beam", "tree"):
        engine = RecordingEngine(HFEngine(model, tok))
        search(model, tok, rows[:1], SearchSpec(strategy=strategy, n=2, max_new_tokens=8), engine=engine)
        assert engine.decoding == ["search.strategy"] and engine.calls == []


def test_eval_generation_goes_through_the_engine(base, monkeypatch):
    from posttrain.eval.generate import generate_texts

    model, tok = base
    engine = RecordingEngine(HFEngine(model, tok))
    out = generate_texts(
        model,
        tok,
        prompts(tok),
        n=2,
        do_sample=True,
        temperature=0.7,
        max_new_tokens=10,
        batch_size=2,
        engine=engine,
        seed=11,
    )
    assert [len(c[0]) for c in engine.calls] == [2, 1] and [c[2] for c in engine.calls] == [11, 13]
    params = engine.calls[0][1]
    assert (params.n, params.temperature, params.top_p, params.max_new_tokens) == (2, 0.7, 1.0, 10)
    assert len(out.texts) == 3 and all(len(t) == 2 for t in out.texts)
    made = []
    monkeypatch.setattr(factory_module, "make_engine", lambda kind, *a, **kw: made.append(kind) or engine)
    generate_texts(model, tok, prompts(tok)[:1], max_new_tokens=4)
    assert made == ["hf"] and engine.calls[-1][1].temperature == 0.0


def test_eval_greedy_equals_hf_generate_and_counts_tokens_the_same_way(base):
    """The engine replaced ``model.generate`` in evaluation: same greedy texts, same token count (generated
    tokens, a completion's EOS counted once), computed here the way the old code did."""
    from posttrain.eval.generate import generate_texts

    model, tok = base
    texts = prompts(tok, QUESTIONS + ["Write in capitals: dog"])
    ours = generate_texts(model, tok, texts, max_new_tokens=12)
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=12,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
    finally:
        tok.padding_side = side
    out = out[:, enc["input_ids"].shape[1] :]
    done = (out == tok.eos_token_id) | (out == tok.pad_token_id)
    assert ours.texts == [[t] for t in tok.batch_decode(out, skip_special_tokens=True)]
    assert ours.new_tokens == int((~done).sum()) + int(done.any(-1).sum())
    assert 0 < sum(done.any(-1).tolist()) < len(texts)  # some finished with EOS, some were cut off


# ------------------------------------------------------------------------------------------ vLLM on a real GPU


def vllm_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (vLLM runs on NVIDIA GPUs only)")
    pytest.importorskip("vllm", reason="needs vLLM: pip install 'posttrain[vllm]' on a GPU machine")


@pytest.mark.gpu
def test_vllm_greedy_equals_hf_and_follows_weight_updates(base, other_weights, record_property):
    vllm_or_skip()
    model, tok = copy.deepcopy(base[0]).cuda(), base[1]
    hf = make_engine("hf", model, tok)
    vllm = make_engine("vllm", model, tok, gpu_memory_utilization=0.2, enforce_eager=True)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
    gaps = []
    for step in range(2):
        if step:  # the trainer stepped: both engines must sample the new weights
            model.load_state_dict(other_weights)
            hf.update_weights(model)
            vllm.update_weights(model)
        a, b = hf.generate(prompts(tok), params, seed=0), vllm.generate(prompts(tok), params, seed=0)
        assert b.texts == a.texts and torch.equal(b.completion_ids, a.completion_ids)
        assert b.finish_reasons == a.finish_reasons
        gaps.append(float((a.logps - b.logps).abs()[a.mask].max()))
    record_property("max_logp_gap", max(gaps))
    print(f"vLLM vs hf engine, greedy: max |log-prob gap| {max(gaps):.2e} (before, after update: {gaps})")
    assert max(gaps) < 1e-2


@pytest.mark.gpu
def test_vllm_sampling_is_seeded_and_its_logps_match_the_trainer_at_temperature(base, record_property):
    vllm_or_skip()
    from posttrain.rollout.scoring import completion_logps

    model, tok = copy.deepcopy(base[0]).cuda(), base[1]
    engine = make_engine("vllm", model, tok, gpu_memory_utilization=0.2, enforce_eager=True)
    params = SamplingParams(n=4, temperature=0.7, max_new_tokens=24)
    a = engine.generate(prompts(tok), params, seed=3)
    b = engine.generate(prompts(tok), params, seed=3)
    assert a.texts == b.texts
    assert len(set(a.texts)) > 1  # the 4 samples of a prompt are not copies of one another
    with torch.no_grad():
        trainer = completion_logps(model, a, temperature=0.7)
    gap = float((trainer - a.logps).abs()[a.mask].max())
    record_property("max_logp_gap_t07", gap)
    print(f"vLLM vs trainer log-probs at temperature 0.7: max gap {gap:.2e}")
    assert gap < 1e-2
