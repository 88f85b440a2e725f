"""Rollout engine: determinism, shared prefill == unshared, engine log-probs == trainer log-probs, stopping."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from posttrain.rollout import HFEngine, SamplingParams
from posttrain.rollout.engine import sample_tokens
from posttrain.rollout.scoring import completion_logps


@pytest.fixture(scope="module")
def base():
    from posttrain.models.loading import load_model

    return load_model("builtin:tiny-base")


def prompts(tok, questions):
    return [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]


QUESTIONS = ["What is 12 + 345?", "Write in capitals: kettle", "Ann has 7 pens."]


def test_same_seed_same_samples_and_other_seed_differs(base):
    model, tok = base
    engine = HFEngine(model, tok)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=24)
    a = engine.generate(prompts(tok, QUESTIONS), params, seed=7)
    b = engine.generate(prompts(tok, QUESTIONS), params, seed=7)
    c = engine.generate(prompts(tok, QUESTIONS), params, seed=8)
    assert a.texts == b.texts and torch.equal(a.logps, b.logps)
    assert a.texts != c.texts
    assert a.prompt_index == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefill_equals_unshared(base, temperature):
    model, tok = base
    params = SamplingParams(n=3, temperature=temperature, max_new_tokens=20)
    shared = HFEngine(model, tok, share_prefill=True).generate(prompts(tok, QUESTIONS), params, seed=3)
    alone = HFEngine(model, tok, share_prefill=False).generate(prompts(tok, QUESTIONS), params, seed=3)
    assert shared.texts == alone.texts
    assert_close(shared.logps, alone.logps, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logps_equal_teacher_forced_logps(base, temperature):
    model, tok = base
    out = HFEngine(model, tok).generate(
        prompts(tok, QUESTIONS), SamplingParams(n=2, temperature=temperature, max_new_tokens=30), seed=0
    )
    with torch.no_grad():
        trainer = completion_logps(model, out, temperature=temperature)
    assert (trainer - out.logps).abs().max() < 1e-4
    assert not trainer[~out.mask].any()


def test_eos_ends_a_completion_and_length_limit(base):
    model, tok = base
    out = HFEngine(model, tok).generate(
        prompts(tok, ["Write in capitals: dog", "What is 123 + 456?"]),
        SamplingParams(n=1, temperature=0.0, max_new_tokens=5),
        seed=0,
    )
    # The capitals answer ends with EOS within 5 tokens; the sum needs more than 5 and is cut off.
    assert out.finish_reasons == ["stop", "length"]
    assert out.texts[0] == "DOG" and out.lengths.tolist() == [4, 5]
    assert out.completion_ids[0, 3].item() == tok.eos_token_id


def test_min_new_tokens_bans_eos_until_reached_and_keeps_untruncated_logps(base):
    model, tok = base
    engine, question = HFEngine(model, tok), prompts(tok, ["Write in capitals: dog"])
    free = engine.generate(question, SamplingParams(temperature=0.0, max_new_tokens=12), seed=0)
    assert free.completion_ids[0, 3].item() == tok.eos_token_id  # "DOG" then EOS
    out = engine.generate(question, SamplingParams(temperature=0.0, max_new_tokens=12, min_new_tokens=8), seed=0)
    assert out.texts[0].startswith("DOG") and out.lengths.item() >= 9
    assert not (out.completion_ids[0, :8] == tok.eos_token_id).any()
    with torch.no_grad():
        trainer = completion_logps(model, out, temperature=1.0)
    # The engine reports log-probs of the untruncated distribution: what the trainer recomputes. At position 3
    # EOS was the likely token, so the token taken instead has a low log-prob.
    assert (trainer - out.logps).abs()[out.mask].max() < 1e-4
    assert out.logps[0, 3] < -1.0


def test_stop_string(base):
    model, tok = base
    # Raw text in the corpus style: the base continues a story, then starts a new line.
    text = "Cy has 48 coins. Bo has 5 cards."
    free = HFEngine(model, tok).generate([text], SamplingParams(temperature=0.0, max_new_tokens=60), seed=0)
    assert "\n" in free.texts[0]
    out = HFEngine(model, tok).generate(
        [text], SamplingParams(temperature=0.0, max_new_tokens=60, stop=("\n",)), seed=0
    )
    assert out.finish_reasons == ["stop"]
    assert out.texts[0] == free.texts[0][: free.texts[0].index("\n") + 1]


def test_top_k_one_is_greedy_and_top_p_keeps_the_head():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        tok, _ = sample_tokens(logits, SamplingParams(top_k=1), g)
        assert tok.item() == 0
    # probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.5 keeps only the first, 0.8 the first two
    seen = {sample_tokens(logits, SamplingParams(top_p=0.8), g)[0].item() for _ in range(200)}
    assert seen == {0, 1}
    _, logp = sample_tokens(logits, SamplingParams(top_p=0.5), g)
    assert_close(logp, torch.log_softmax(logits, -1)[:, 0])  # log-prob under the untruncated distribution


def test_shared_prompt_training_forward_equals_unshared_values_and_gradients(base):
    model, tok = base
    out = HFEngine(model, tok).generate(
        prompts(tok, QUESTIONS), SamplingParams(n=3, temperature=1.0, max_new_tokens=16), seed=2
    )
    assert len(set(out.lengths.tolist())) > 1  # completions of different lengths, prompts of different lengths
    rows = [0, 2, 3, 5, 6, 7, 8]  # a subset, prompts interleaved, one prompt with a single completion
    grads = []
    for share in (True, False):
        model.zero_grad()
        logps, entropy = completion_logps(model, out, rows=rows, with_entropy=True, share_prompts=share)
        (logps * torch.linspace(-1, 1, logps.shape[1])).sum().backward()
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters()}, logps.detach(), entropy))
    (g_shared, lp_shared, ent_shared), (g_alone, lp_alone, ent_alone) = grads
    assert_close(lp_shared, lp_alone, rtol=1e-5, atol=1e-5)
    assert_close(ent_shared, ent_alone, rtol=1e-5, atol=1e-5)
    for name, g in g_alone.items():  # fp32 sums in another order: equal up to a small fraction of the largest entry
        assert_close(g_shared[name], g, rtol=1e-3, atol=1e-4 * float(g.abs().max()))
    assert (lp_shared - out.logps[rows]).abs().max() < 1e-4
    model.zero_grad()


def _llama(dtype=torch.float32, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    sizes.update(num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    config = LlamaConfig(**{**sizes, **extra})
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize(
    "dtype, extra",
    [(torch.float32, {}), (torch.bfloat16, {}), (torch.float32, {"attention_bias": True, "mlp_bias": True})],
)
def test_lean_decode_step_logits_are_bitwise_the_models(dtype, extra):
    """LlamaDecodeStep == model(...) under the engine's decode attention, torch.equal: GQA, bf16, biases, left
    padding in the mask, several steps (the cache it fills is the one the model reads, and vice versa)."""
    from posttrain.models.varlen import decoding_attention
    from posttrain.rollout.decode import lean_decoder
    from posttrain.rollout.engine import make_cache

    model = _llama(dtype, **extra)
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    caches = [make_cache(model, 12), make_cache(model, 12)]
    with torch.no_grad(), decoding_attention(model):
        for cache in caches:
            model(ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0), past_key_values=cache)
        step = lean_decoder(model, caches[0])
        assert step is not None
        positions, new = attn.sum(-1), torch.tensor([8, 9])
        for _ in range(4):
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
            lean = step(new, attn, positions)
            ref = model(
                input_ids=new[:, None], attention_mask=attn, position_ids=positions[:, None], past_key_values=caches[1]
            ).logits[:, -1]
            assert lean.dtype == ref.dtype and torch.equal(lean, ref), (lean - ref).abs().max()
            new, positions = ref.argmax(-1), positions + 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_lean_engine_rollouts_are_bitwise_the_models(base, temperature, monkeypatch):
    """Whole rollouts with and without the lean step: the same tokens, log-probs and masks, with prompts of
    different lengths (padding), rows finishing early and leaving the batch, and a minimum length."""
    from posttrain.rollout.decode import LlamaDecodeStep

    model, tok = base
    params = SamplingParams(n=3, temperature=temperature, max_new_tokens=40, min_new_tokens=2)
    calls = []
    monkeypatch.setattr(
        LlamaDecodeStep, "__call__", lambda self, *a, _f=LlamaDecodeStep.__call__: calls.append(1) or _f(self, *a)
    )
    lean = HFEngine(model.eval(), tok).generate(prompts(tok, QUESTIONS), params, seed=5)
    assert len(calls) == lean.forward_passes - 1  # every decode step went through it
    plain = HFEngine(model, tok, lean=False).generate(prompts(tok, QUESTIONS), params, seed=5)
    assert len(calls) == lean.forward_passes - 1 and plain.forward_passes == lean.forward_passes
    assert "stop" in lean.finish_reasons and "length" in lean.finish_reasons  # rows left the batch early
    assert lean.texts == plain.texts and lean.finish_reasons == plain.finish_reasons
    assert torch.equal(lean.completion_ids, plain.completion_ids) and torch.equal(lean.mask, plain.mask)
    assert torch.equal(lean.logps, plain.logps)


def test_lean_decoder_declines_what_it_cannot_reproduce(tiny_model):
    """None (the engine then calls the model) for: training mode, attention other than the decode one, a
    forward hook, a LoRA adapter, a non-Llama model."""
    from peft import LoraConfig, get_peft_model

    from posttrain.models.varlen import decoding_attention
    from posttrain.rollout.decode import lean_decoder
    from posttrain.rollout.engine import make_cache

    model = tiny_model.eval()
    cache = make_cache(model, 8)
    assert lean_decoder(model, cache) is None  # outside decoding_attention: SDPA, not the decode attention
    with decoding_attention(model):
        assert lean_decoder(model, cache) is not None
        assert lean_decoder(model.train(), cache) is None
        model.eval()
        handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
        assert lean_decoder(model, cache) is None
        handle.remove()
        assert lean_decoder(model, cache) is not None
    lora = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with decoding_attention(lora):
        assert lean_decoder(lora, cache) is None and lean_decoder(lora.get_base_model(), cache) is None
