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
