"""A lean decode step for Llama-architecture models: the same operations as ``transformers``' forward, without it.

One decode step of SmolLM2-135M for 8 rows on a 2-core CPU is ~31 ms of matmuls (they stream every weight once)
and, through ``model(...)``, ~15 ms of everything else, most of it Python: keyword plumbing, output
dataclasses, the mask factory, the cache's dispatch, module hooks, about 4,700 small operator calls per step.
This step calls the same functions on the same tensors in the same order (the layers' own norms, ``F.linear``
with their weights, the model's rotary embedding and ``apply_rotary_pos_emb``, the engine's decode attention,
the cache layers' ``update``), so its logits are bitwise those of ``model(...)`` (tests/test_rollout.py checks
``torch.equal`` on logits and on whole sampled rollouts); it only skips the machinery around them.

It takes only models it can reproduce exactly (:func:`lean_decoder` returns ``None`` otherwise, and the engine
calls the model as before): ``LlamaForCausalLM`` itself (SmolLM2, the built-in tiny models), plain
``nn.Linear`` projections (no adapters, no quantized or hooked modules), SiLU MLPs, SDPA attention (inside
``decoding_attention``, which swaps it for the engine's decode attention), a preallocated cache, evaluation
mode.

    >>> import torch
    >>> from posttrain.models.tiny import build_model, build_tokenizer
    >>> from posttrain.rollout.engine import make_cache
    >>> model = build_model(build_tokenizer()).eval()
    >>> cache = make_cache(model, 8)
    >>> from posttrain.models.varlen import decoding_attention
    >>> with torch.no_grad(), decoding_attention(model):
    ...     step = lean_decoder(model, cache)
    ...     _ = model(torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True)
    ...     logits = step(torch.tensor([8]), torch.ones(1, 4, dtype=torch.long), torch.tensor([3]))
    >>> logits.shape == (1, model.config.vocab_size)
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posttrain.models.varlen import decode_attention


class LlamaDecodeStep:
    """``step(tokens (B,), attention_mask (B, L) incl. the new token, positions (B,)) -> logits (B, V)``: one
    token per row through the model, its keys and values appended to ``cache``; what
    ``model(input_ids=tokens[:, None], attention_mask=..., position_ids=positions[:, None], past_key_values=cache,
    use_cache=True).logits[:, -1]`` returns under the engine's decode attention, bit for bit."""

    def __init__(self, model: Any, cache: Any):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.model, self.cache, self.rope = model, cache, apply_rotary_pos_emb
        inner = model.model
        self.embed, self.rotary, self.norm, self.head = inner.embed_tokens, inner.rotary_emb, inner.norm, model.lm_head
        self.layers = [
            (
                layer.input_layernorm,
                layer.self_attn,
                *((p.weight, p.bias) for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                (layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias),
                layer.post_attention_layernorm,
                *((p.weight, p.bias) for p in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)),
                cache.layers[i],
            )
            for i, layer in enumerate(inner.layers[: model.config.num_hidden_layers])
        ]

    @torch.no_grad()
    def __call__(self, tokens: Tensor, attention_mask: Tensor, positions: Tensor) -> Tensor:
        hidden = self.embed(tokens[:, None])
        cos, sin = self.rotary(hidden, positions[:, None])
        mask = attention_mask.bool()[:, None, None, :]
        b = hidden.shape[0]
        for norm_in, attn, q_proj, k_proj, v_proj, o_proj, norm_post, gate, up, down, cache in self.layers:
            residual = hidden
            x = norm_in(hidden)
            q, k, v = (F.linear(x, *p).view(b, 1, -1, attn.head_dim).transpose(1, 2) for p in (q_proj, k_proj, v_proj))
            q, k = self.rope(q, k, cos, sin)
            keys, values = cache.update(k, v)
            out, _ = decode_attention(attn, q, keys, values, mask, scaling=attn.scaling)
            hidden = residual + F.linear(out.reshape(b, 1, -1).contiguous(), *o_proj)
            residual = hidden
            x = norm_post(hidden)
            hidden = residual + F.linear(F.silu(F.linear(x, *gate)) * F.linear(x, *up), *down)
        return self.head(self.norm(hidden))[:, -1]


def lean_decoder(model: Any, cache: Any) -> LlamaDecodeStep | None:
    """A :class:`LlamaDecodeStep` for ``model`` and ``cache`` when it reproduces ``model(...)`` exactly, else None.
    ``cache``: a ``Cache`` whose layers' ``update(k, v)`` appends and returns the keys and values so far (the
    engine's ``PreallocatedLayer``; the engine checks)."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import (
        LlamaAttention,
        LlamaDecoderLayer,
        LlamaForCausalLM,
        LlamaMLP,
        LlamaRMSNorm,
    )

    from posttrain.models.varlen import DECODE_NAME

    if type(model) is not LlamaForCausalLM or model.training or cache is None:
        return None
    config = model.config
    if config._attn_implementation != DECODE_NAME or config.hidden_act != "silu":  # inside decoding_attention
        return None
    expected = {LlamaDecoderLayer, LlamaAttention, LlamaMLP, LlamaRMSNorm, nn.Linear, SiLUActivation}
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return None
        if name.startswith("model.layers.") and name.count(".") > 2 and type(module) not in expected:
            return None  # the layers' parts must be the plain ones this step calls (F.silu = SiLUActivation)
        if isinstance(module, nn.Linear) and (type(module) is not nn.Linear or type(module.weight) is not nn.Parameter):
            return None  # adapters, quantized weights (tensor subclasses)
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    return LlamaDecodeStep(model, cache)
