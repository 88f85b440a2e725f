"""Memory: the chunked head (``posttrain.losses.chunked``, ``posttrain.models.forward``) against full logits, in values
and gradients, fp32 and bf16; it never holds a full (S, V) logits tensor; gradient checkpointing changes no
gradient, packed sequences included."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

from posttrain.data.batching import pack
from posttrain.data.encode import Example
from posttrain.eval.loss import packed_token_losses
from posttrain.losses import sft_loss, token_logps
from posttrain.losses.chunked import CHUNK_TOKENS, chunked_token_logps
from posttrain.models.forward import PLAIN_HEADS, SCALED_HEADS, SOFTCAPPED_HEADS, output_head, packed_logps
from posttrain.models.varlen import packed_attention
from posttrain.train.scaffold import enable_gradient_checkpointing


def _examples(n: int = 4, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 9 + 5 * i  # 9, 14, 19, 24: 66 tokens, a length no tested chunk size divides
        ids = torch.randint(7, 100, (length,), generator=g).tolist()
        out.append(Example(input_ids=ids, loss_mask=[False] * 3 + [True] * (length - 3)))
    return out


def _full_logps(model, batch):
    """The unchunked reference: the model's own (1, S, V) logits, then log-softmax at the targets."""
    with packed_attention(model):
        logits = model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, posttrain_bounds=batch.bounds, use_cache=False
        ).logits
    return logits, token_logps(logits, batch.targets)


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 64])
def test_chunked_equals_unchunked_values_and_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (1, 37), generator=g)
    upstream = torch.randn(1, 37, generator=g, dtype=torch.float64)  # an arbitrary loss on top

    logps, stats = chunked_token_logps(hidden, weight, targets, chunk_size=chunk, with_entropy=True)
    (logps * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logits = hidden @ weight.T
    ref = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    (ref * upstream).sum().backward()
    assert_close(logps, ref)
    assert_close(grads[0], hidden.grad)
    assert_close(grads[1], weight.grad)
    assert torch.equal(stats["argmax"], logits.argmax(-1))
    probs = torch.softmax(logits, -1)
    assert_close(stats["entropy"], -(probs * probs.log()).sum(-1))
    assert not stats["entropy"].requires_grad


def test_scale_softcap_and_temperature_follow_the_models_formula():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 6, (10,), generator=g)
    logps, _ = chunked_token_logps(hidden, weight, targets, chunk_size=3, scale=0.5, softcap=2.0, temperature=0.7)
    logits = 2.0 * torch.tanh(hidden @ weight.T * 0.5 / 2.0) / 0.7  # Gemma's cap * tanh(x / cap), then 1/T
    assert_close(logps, torch.log_softmax(logits, -1)[torch.arange(10), targets])


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 1, 2, 3])
    fn = lambda h, w: chunked_token_logps(h, w, targets, chunk_size=2, softcap=1.5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale, temperature", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.7), (0.25, 1.3)])
def test_fused_target_log_softmax_is_bitwise_autograds(dtype, scale, temperature):
    """TargetLogSoftmax (used whenever there is no soft-cap) gives exactly autograd's values and gradients through
    the same formula: log-probs, entropy, argmax and the logits' gradient are torch.equal, in fp32 and from a
    bf16 head. Bitwise, not close: a rounding change here breaks batch invariance downstream (Adam moves a
    rounding-sized gradient element by up to lr)."""
    from posttrain.losses.chunked import TargetLogSoftmax, _logits

    g = torch.Generator().manual_seed(5)
    raw = (torch.randn(37, 1000, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 1000, (37,), generator=g)
    weights = torch.randn(37, generator=g)
    a = raw.clone().requires_grad_()
    logps, top, entropy = TargetLogSoftmax.apply(a, targets, scale, temperature, True)
    (logps * weights).sum().backward()
    b = raw.clone().requires_grad_()
    x = _logits(b, scale, 0.0, temperature)
    lse = torch.logsumexp(x, dim=-1)
    ref = torch.gather(x, -1, targets[:, None]).squeeze(-1) - lse
    (ref * weights).sum().backward()
    logp_all = x.detach() - lse.detach()[:, None]
    assert torch.equal(logps, ref) and torch.equal(top, x.argmax(-1))
    assert torch.equal(entropy, -logp_all.exp().mul_(logp_all).sum(-1))
    assert a.grad.dtype == dtype and torch.equal(a.grad, b.grad), (a.grad - b.grad).abs().max()


def test_fused_target_log_softmax_gradcheck_and_run_twice():
    """float64 gradcheck through scale and temperature; a retained graph gives the same gradient twice."""
    from posttrain.losses.chunked import TargetLogSoftmax

    g = torch.Generator().manual_seed(6)
    raw = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 5, 2, 2])
    fn = lambda r: TargetLogSoftmax.apply(r, targets, 0.5, 0.7, False)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (raw,))
    out = fn(raw).sum()
    first = torch.autograd.grad(out, raw, retain_graph=True)[0]
    assert torch.equal(torch.autograd.grad(out, raw)[0], first)


def test_empty_input():
    logps, stats = chunked_token_logps(torch.zeros(0, 3), torch.ones(4, 3), torch.zeros(0, dtype=torch.long))
    assert logps.shape == stats["argmax"].shape == (0,)


def test_tiny_model_chunked_equals_full_logits_through_the_model(tiny_model):
    batch = pack(_examples())
    logits, ref = _full_logps(tiny_model, batch)
    ref_losses, ref_correct = sft_loss(logits, batch.targets, batch.target_mask)
    ref_losses.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad(set_to_none=True)

    logps, _ = packed_logps(
        tiny_model, batch.input_ids, batch.position_ids, batch.targets, chunk_size=7, posttrain_bounds=batch.bounds
    )
    assert_close(logps, ref, rtol=0, atol=1e-5)
    losses, correct = packed_token_losses(tiny_model, batch)  # the default chunk size
    assert torch.equal(correct, ref_correct)
    losses.sum().backward()
    assert_close(losses, ref_losses, rtol=0, atol=1e-5)
    for name, p in tiny_model.named_parameters():
        assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_close_to_unchunked(tiny_model):
    batch = pack(_examples())
    upstream = torch.randn(batch.targets.shape, generator=torch.Generator().manual_seed(3))
    results = []
    for chunked in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:  # the backward recomputes each chunk under the autocast state of its forward
                logps, _ = packed_logps(
                    tiny_model,
                    batch.input_ids,
                    batch.position_ids,
                    batch.targets,
                    chunk_size=9,
                    posttrain_bounds=batch.bounds,
                )
            else:
                _, logps = _full_logps(tiny_model, batch)
        (logps * upstream).sum().backward()
        results.append((logps.detach(), [p.grad.clone() for p in tiny_model.parameters()]))
        tiny_model.zero_grad(set_to_none=True)
    (ref, ref_grads), (logps, grads) = results
    assert logps.dtype == torch.float32  # the log-softmax runs in fp32 even though the head ran in bf16
    assert_close(logps, ref, rtol=0, atol=2e-2)
    for got, want in zip(grads, ref_grads):
        assert (got - want).norm() <= 2e-2 * want.norm() + 1e-6
    _, fp32 = _full_logps(tiny_model, batch)
    assert (logps - fp32.detach()).abs().max() < 0.1  # and bf16 stays near the fp32 numbers


def test_fallback_path_reads_the_models_own_logits_the_same_way(tiny_model, monkeypatch):
    """A model type output_head does not know goes through its own forward: same log-probs, entropy and hidden
    states at the read positions, with temperature (as the RL scorers ask)."""
    import posttrain.models.forward as forward

    batch = pack(_examples())
    positions = torch.tensor([3, 7, 8, 20, 40, 65])
    args = (tiny_model, batch.input_ids, batch.position_ids, batch.targets[0, positions])
    kwargs = dict(positions=positions, temperature=0.7, with_entropy=True, return_hidden=True, chunk_size=4)
    split, split_stats = packed_logps(*args, **kwargs, posttrain_bounds=batch.bounds)
    monkeypatch.setattr(forward, "PLAIN_HEADS", frozenset())
    assert output_head(tiny_model) is None
    full, full_stats = packed_logps(*args, **kwargs, posttrain_bounds=batch.bounds)
    assert_close(split, full, rtol=0, atol=1e-5)
    for key in ("entropy", "hidden"):
        assert_close(split_stats[key], full_stats[key], rtol=0, atol=1e-5)
    assert torch.equal(split_stats["argmax"], full_stats["argmax"])


class RowRecorder(torch.nn.Module):
    """Wraps the output head and records the rows of every call."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head, self.rows = head, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return self.head(x)


def test_never_materialises_full_logits(tiny_model, monkeypatch):
    monkeypatch.setattr("posttrain.losses.chunked.SMALL_LOGITS_BYTES", 0)  # the tiny model's logits count as large
    batch = pack(_examples() * 3)  # 198 tokens
    seq, vocab = batch.input_ids.shape[1], tiny_model.config.vocab_size
    tiny_model.lm_head = recorder = RowRecorder(tiny_model.lm_head)
    vocab_rows = [0]  # the most rows of any (rows, V) tensor autograd keeps for the backward

    def pack_hook(t: torch.Tensor) -> torch.Tensor:
        if t.dim() and t.shape[-1] == vocab:
            vocab_rows[0] = max(vocab_rows[0], t.numel() // vocab)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        logps, _ = packed_logps(
            tiny_model, batch.input_ids, batch.position_ids, batch.targets, chunk_size=32, posttrain_bounds=batch.bounds
        )
        logps.sum().backward()
    # Forward: ceil(198 / 32) = 7 calls, then the backward recomputes each chunk once; none sees more than 32 rows.
    assert seq == 198 and sorted(recorder.rows) == [6, 6] + [32] * 12
    assert vocab_rows[0] == 0  # nothing of the logits is kept for the backward: each chunk is recomputed there
    recorder.rows.clear()
    packed_token_losses(tiny_model, batch)[0].sum().backward()
    assert max(recorder.rows) <= CHUNK_TOKENS


def test_small_logits_are_kept_not_recomputed_with_the_same_values_and_gradients(monkeypatch):
    """Below SMALL_LOGITS_BYTES the backward reuses each chunk's logits (one head call per chunk, not two); the
    values and gradients are those of the checkpointed path."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(70, 8, generator=g), torch.randn(50, 8, generator=g)
    targets = torch.randint(0, 50, (70,), generator=g)
    results, calls = {}, {}
    for threshold in (0, 1 << 30):
        monkeypatch.setattr("posttrain.losses.chunked.SMALL_LOGITS_BYTES", threshold)
        head = RowRecorder(torch.nn.Linear(8, 50, bias=False))
        head.head.weight.data.copy_(weight)
        head.weight = head.head.weight  # what the threshold reads the vocabulary size from
        h = hidden.clone().requires_grad_(True)
        logps, stats = chunked_token_logps(h, head, targets, chunk_size=32, with_entropy=True)
        logps.sum().backward()
        results[threshold] = (logps.detach(), stats["entropy"], h.grad, head.head.weight.grad)
        calls[threshold] = sorted(head.rows)
    assert calls == {0: [6, 6, 32, 32, 32, 32], 1 << 30: [6, 32, 32]}
    for kept, recomputed in zip(results[1 << 30], results[0]):
        assert_close(kept, recomputed, rtol=0, atol=0)


def test_grouped_branches_of_unequal_length_attend_as_if_each_followed_its_prefix_alone():
    """prefix_attention runs a group's branches as one padded batch: each branch's output and gradients equal
    attention over [prefix, that branch] alone (causal), for branches of different lengths, GQA included."""
    import torch.nn.functional as F

    from posttrain.models.varlen import prefix_attention

    g = torch.Generator().manual_seed(0)
    prefix, branches = 4, (3, 6, 1)
    total = prefix + sum(branches)
    q = torch.randn(1, 4, total, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 2, total, 8, generator=g, requires_grad=True)
    v = torch.randn(1, 2, total, 8, generator=g, requires_grad=True)
    out = prefix_attention(q, k, v, ((prefix, branches),), gqa=True)
    weights = torch.randn(out.shape, generator=g)
    (out * weights).sum().backward()
    got = (out.detach(), q.grad, k.grad, v.grad)
    q.grad = k.grad = v.grad = None

    def alone(idx: torch.Tensor) -> torch.Tensor:  # plain causal attention over the positions idx, on their own
        return F.scaled_dot_product_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx], is_causal=True, enable_gqa=True)

    pieces, start = [alone(torch.arange(prefix))], prefix
    for n in branches:
        pieces.append(alone(torch.cat([torch.arange(prefix), torch.arange(start, start + n)]))[:, :, prefix:])
        start += n
    ref = torch.cat(pieces, dim=2)
    (ref * weights).sum().backward()
    for a, b in zip(got, (ref.detach(), q.grad, k.grad, v.grad)):
        assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lengths", [(5, 3, 6), (1, 9), (2, 2, 2, 2), (12, 1, 1)])
def test_packed_sequences_attend_each_to_itself(lengths):
    """varlen attention over packed sequences: outputs and gradients equal plain causal attention over each
    sequence on its own, GQA included."""
    import torch.nn.functional as F

    from posttrain.models.varlen import varlen_attention

    g = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q = torch.randn(1, 4, total, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 2, total, 8, generator=g, requires_grad=True)
    v = torch.randn(1, 2, total, 8, generator=g, requires_grad=True)
    bounds = tuple(sum(lengths[:i]) for i in range(len(lengths) + 1))
    out, _ = varlen_attention(torch.nn.Module(), q, k, v, None, posttrain_bounds=bounds)  # (1, S, H, D)
    weights = torch.randn(out.shape, generator=g)
    (out * weights).sum().backward()
    got = (out.detach(), q.grad, k.grad, v.grad)
    q.grad = k.grad = v.grad = None
    pieces = [
        F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, enable_gqa=True)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    ref = torch.cat(pieces, dim=2).transpose(1, 2)
    (ref * weights).sum().backward()
    for a, b in zip(got, (ref.detach(), q.grad, k.grad, v.grad)):
        assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prefix", [0, 7])
def test_a_sequences_attention_is_bitwise_the_same_whatever_its_neighbours(prefix):
    """Sequences of one padding bucket attend in one batched call, each padded to a length set by its own length
    alone: so a sequence's outputs and gradients are bitwise equal packed with others or alone, as packed rows or
    as the branches of a shared prompt (the property that makes one batch equal accumulated micro-batches, and 1
    process equal DDP/FSDP2). Padding to the batch's longest broke this: the kernel's blocking follows the padded
    length."""
    from posttrain.models.varlen import BUCKET, buckets, varlen_attention

    lengths = (69, 30, 150, 91, 91, 32, 91, 33, 5)
    assert len(buckets(list(lengths))) < len(lengths)  # some sequences do share a call
    assert all(b % BUCKET == 0 and b - BUCKET < min(lengths[i] for i in m) for b, m in buckets(list(lengths)).items())
    g = torch.Generator().manual_seed(1)
    size = prefix + sum(lengths)
    q, k, v = (torch.randn(1, h, size, 16, generator=g) for h in (4, 2, 2))
    weights = torch.randn(1, size, 4, 16, generator=g)
    starts = [prefix + sum(lengths[:i]) for i in range(len(lengths) + 1)]

    def attend(parts):  # the prefix (if any), then the sequences ``parts``: each one's (out, dq, dk, dv)
        spans = [(starts[i], starts[i + 1]) for i in parts]
        index = torch.tensor([*range(prefix), *(j for s, e in spans for j in range(s, e))])
        tensors = [t[:, :, index].clone().requires_grad_() for t in (q, k, v)]
        ls = [lengths[i] for i in parts]
        if prefix:
            layout = {"posttrain_groups": ((prefix, tuple(ls)),)}
        else:
            layout = {"posttrain_bounds": tuple(sum(ls[:i]) for i in range(len(ls) + 1))}
        out, _ = varlen_attention(torch.nn.Module(), *tensors, None, **layout)
        (out * weights[:, index]).sum().backward()
        full = [out.detach().transpose(1, 2), *(t.grad for t in tensors)]
        at = [prefix + sum(ls[:i]) for i in range(len(ls) + 1)]
        return [[t[:, :, at[i] : at[i + 1]] for t in full] for i in range(len(ls))]

    together = attend(range(len(lengths)))
    for i in range(len(lengths)):
        (alone,) = attend([i])
        for name, a, b in zip(("out", "dq", "dk", "dv"), alone, together[i]):
            assert torch.equal(a, b), (lengths[i], name, (a - b).abs().max())


def _tiny_config(kind: str):
    from transformers import AutoConfig

    sizes = dict(
        vocab_size=61,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    extra = {
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8
        ),
        "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8),
        "gemma2": dict(final_logit_softcapping=0.5),
        "gemma3_text": dict(final_logit_softcapping=0.5),
        "granite": dict(logits_scaling=4.0),
        "cohere": dict(logit_scale=0.25),
        "gpt2": dict(n_embd=16, n_layer=2, n_head=4, n_positions=64),
    }
    return AutoConfig.for_model(kind, **{**sizes, **extra.get(kind, {})})


def test_every_listed_model_type_splits_into_its_own_logits():
    """For each model type ``output_head`` splits, softcap(head(decoder(x)) x scale) is the model's own logits."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 2, 33, 60, 7, 4]])
    targets = torch.tensor([[5, 9, 2, 33, 60, 7, 4, 0]])
    for kind in sorted(PLAIN_HEADS | SOFTCAPPED_HEADS | SCALED_HEADS.keys()):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_tiny_config(kind)).eval()
        split = output_head(model)
        with torch.no_grad():
            ref = token_logps(model(input_ids=ids).logits, targets)
            hidden = split.decoder(input_ids=ids).last_hidden_state
            logps, _ = chunked_token_logps(
                hidden, split.head, targets, chunk_size=3, scale=split.scale, softcap=split.softcap
            )
            plain, _ = chunked_token_logps(hidden, split.head, targets)
        assert_close(logps, ref, rtol=0, atol=1e-5, msg=kind)
        if kind not in PLAIN_HEADS:  # the scale or cap matters for these logits: without it they would differ
            assert (plain - ref).abs().max() > 1e-3, kind


def test_peft_models_split_below_the_wrapper_prompt_learning_too(tiny_model):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from posttrain.models.lora import add_lora

    batch = pack(_examples())
    lora = add_lora(tiny_model, rank=4)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # adapters that change the output
    assert output_head(lora) is not None
    _, ref = _full_logps(lora, batch)
    logps, _ = packed_logps(lora, batch.input_ids, batch.position_ids, batch.targets, posttrain_bounds=batch.bounds)
    assert_close(logps, ref, rtol=0, atol=1e-5)
    with lora.disable_adapter():
        _, base = _full_logps(lora, batch)
        off, _ = packed_logps(lora, batch.input_ids, batch.position_ids, batch.targets, posttrain_bounds=batch.bounds)
    assert_close(off, base, rtol=0, atol=1e-5)
    assert (off - logps).abs().max() > 1e-3
    prompt = get_peft_model(lora.unload(), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=2))
    split = output_head(prompt)  # virtual tokens are added by packed_logps (posttrain.models.virtual)
    assert split is not None and split.decoder is prompt.get_base_model().model


def _sft_gradients(model, batch):
    losses, _ = packed_token_losses(model, batch)
    losses.sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients_on_packed_rows(tokenizer):
    from posttrain.models.lora import add_lora
    from posttrain.models.tiny import build_model

    batch = pack(_examples())
    for lora_rank in (0, 4):
        models = []
        for checkpointed in (False, True):
            model = build_model(tokenizer, seed=0)
            torch.manual_seed(0)  # the same adapter initialisation in both
            model = add_lora(model, rank=lora_rank) if lora_rank else model
            if checkpointed:
                enable_gradient_checkpointing(model)
            models.append(model.train())
        ref, got = _sft_gradients(models[0], batch), _sft_gradients(models[1], batch)
        assert ref.keys() == got.keys() and ref
        for name in ref:
            # Per-sequence attention in the recompute too: the backward runs after packed_attention's block closed.
            assert_close(got[name], ref[name], rtol=0, atol=1e-6, msg=name)


def test_gradient_checkpointing_finds_the_policy_inside_ppo_wrapper(tiny_model):
    from posttrain.train.ppo import PolicyWithValue

    pv = PolicyWithValue(tiny_model, tiny_model.config.hidden_size)
    enable_gradient_checkpointing(pv)
    assert all(layer.gradient_checkpointing for layer in tiny_model.model.layers)


def test_sft_stage_with_gradient_checkpointing_trains_the_same(tmp_path, tokenizer):
    from posttrain.config import SFTConfig, build_config
    from posttrain.models.tiny import build_model
    from posttrain.train.sft import train

    cfg = build_config(
        SFTConfig, {"max_steps": 2, "batch_size": 2, "lr": 1e-2, "progress": False, "log_every": 1}, path="sft"
    )
    losses = []
    for checkpointed in (False, True):
        model = build_model(tokenizer, seed=0)
        result = train(
            model, _examples(), replace(cfg, gradient_checkpointing=checkpointed), tmp_path / str(checkpointed)
        )
        losses.append(result.final_loss)
        assert model.model.layers[0].gradient_checkpointing is checkpointed
    assert math.isclose(losses[0], losses[1], rel_tol=1e-6)
