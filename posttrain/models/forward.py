"""One packed forward to per-token log-probs without full-vocabulary logits: the model is split at its output
head (:func:`output_head`) and the head is applied a chunk of tokens at a time (``posttrain.losses.chunked``).
Shared by SFT and held-out losses (``posttrain.eval.loss``), DPO and the RL scorers (``posttrain.rollout``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from posttrain.losses.chunked import CHUNK_TOKENS, chunked_token_logps
from posttrain.models.varlen import packed_attention
from posttrain.models.virtual import PREFIX_TYPES, PROMPT_TYPES, packed_inputs, virtual_tokens

# Model types whose causal LM computes ``logits = lm_head(decoder(...).last_hidden_state)``, the last two
# entries with a scale or soft-cap read from the config (``output_head``); tests/test_memory.py checks each
# against the model's own logits. Any other model keeps its own forward and full logits (correct, not lean).
PLAIN_HEADS = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo2", "gemma", "gpt2"}
)
SOFTCAPPED_HEADS = frozenset({"gemma2", "gemma3_text"})  # cap * tanh(logits / cap), final_logit_softcapping
SCALED_HEADS = {"granite": lambda c: 1.0 / c.logits_scaling, "cohere": lambda c: c.logit_scale}
# peft methods that only change layers' weights (no virtual tokens, no per-call arguments): the decoder can be
# called directly.
LAYER_ADAPTERS = frozenset({"LORA", "ADALORA", "IA3", "LOHA", "LOKR", "OFT", "BOFT", "VERA"})


@dataclass(frozen=True)
class OutputHead:
    """A causal LM split at its output layer: logits = softcap(head(decoder(...).last_hidden_state) x scale)."""

    decoder: Any
    head: Any
    scale: float = 1.0
    softcap: float = 0.0


def output_head(model: Any) -> OutputHead | None:
    """The decoder and output head of ``model`` (a ``transformers`` causal LM, possibly ``peft``-wrapped), or None
    when its logits are not known to be the head of the decoder's output (then callers use the model's logits).

    >>> from posttrain.models.tiny import build_model, build_tokenizer
    >>> split = output_head(build_model(build_tokenizer()))
    >>> type(split.decoder).__name__, type(split.head).__name__, split.softcap
    ('LlamaModel', 'Linear', 0.0)
    """
    if hasattr(model, "peft_config"):
        adapter = model.active_peft_config
        kind = str(adapter.peft_type.value)
        if kind not in LAYER_ADAPTERS | PROMPT_TYPES | PREFIX_TYPES or getattr(
            adapter, "alora_invocation_tokens", None
        ):
            return None
        model = model.get_base_model()  # its layers carry the adapters; virtual tokens are added by packed_logps
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in PLAIN_HEADS | SOFTCAPPED_HEADS | SCALED_HEADS.keys():
        return None
    return OutputHead(
        model.get_decoder(),
        model.get_output_embeddings(),
        scale=SCALED_HEADS[kind](config) if kind in SCALED_HEADS else 1.0,
        softcap=(config.final_logit_softcapping or 0.0) if kind in SOFTCAPPED_HEADS else 0.0,
    )


def target_logps(model: Any, batch: Any) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Log-probs (n,) of the n target tokens of a packed batch (``posttrain.data.batching.PackedBatch``), their
    positions in the row (n,) and the stats of :func:`packed_logps`. The output head runs on those positions
    only: with chat templates prompts (a system turn included) are often half the tokens, and at a 49k
    vocabulary the head is a fifth of a small model's compute."""
    where = batch.target_mask[0].nonzero().squeeze(-1)
    logps, stats = packed_logps(
        model,
        batch.input_ids,
        batch.position_ids,
        batch.targets[0, where],
        positions=where,
        posttrain_bounds=batch.bounds,
    )
    return logps, where, stats


def packed_logps(
    model: Any,
    input_ids: Tensor,
    position_ids: Tensor,
    targets: Tensor,
    *,
    positions: Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    return_hidden: bool = False,
    chunk_size: int = CHUNK_TOKENS,
    **layout: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Log-probs of ``targets`` under ``model`` for one packed row, in one forward with per-sequence attention.

    Args: input_ids, position_ids (1, S); ``layout``: ``posttrain_bounds`` or ``posttrain_groups`` (see
    ``posttrain.models.varlen``); positions (n,) the predicting positions to read (default all S); targets (n,)
    or (1, S) ids, one per position read; ``temperature`` divides the logits (the sampler's distribution).
    Returns (logps shaped like ``targets``, fp32; stats: "argmax" and, if asked, "entropy" (detached), and
    with ``return_hidden`` "hidden" (n, H), the last hidden state at each position read, with gradient).

    >>> import torch
    >>> from posttrain.models.tiny import build_model, build_tokenizer
    >>> model = build_model(build_tokenizer())
    >>> ids, pos = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[0, 1, 2, 0, 1]])  # two sequences: 3 + 2
    >>> logps, stats = packed_logps(model, ids, pos, torch.tensor([[6, 7, 0, 9, 0]]), posttrain_bounds=(0, 3, 5))
    >>> logps.shape, stats["argmax"].shape
    (torch.Size([1, 5]), torch.Size([1, 5]))
    """
    states, head, output, real = _packed_states(
        model, input_ids, position_ids, positions, layout, return_hidden=return_hidden
    )
    logps, stats = chunked_token_logps(
        states,
        **head,
        targets=targets.reshape(-1),
        chunk_size=chunk_size,
        temperature=temperature,
        with_entropy=with_entropy,
    )
    logps, stats = logps.view(targets.shape), {k: v.view(targets.shape) for k, v in stats.items()}
    if return_hidden:
        if head["head"] is not None:
            stats["hidden"] = states
        else:
            last = output.hidden_states[-1][0]
            last = last if real is None else last[real]
            stats["hidden"] = last if positions is None else last[positions]
    return logps, stats


def packed_states(model: Any, batch: Any) -> tuple[Tensor, dict[str, Any]]:
    """What the output head reads at the n target positions of a packed batch, and the head: (states (n, H),
    {"head": module, "scale", "softcap"}) for a model split at its head, else (its logits (n, V), {"head": None}).
    ``posttrain.losses.chunked`` functions take the pair, so a loss that needs whole distributions (distillation)
    still never holds more than a chunk of logits."""
    where = batch.target_mask[0].nonzero().squeeze(-1)
    layout = {"posttrain_bounds": batch.bounds}
    states, head, _, _ = _packed_states(model, batch.input_ids, batch.position_ids, where, layout)
    return states, head


def _packed_states(
    model: Any, input_ids: Tensor, position_ids: Tensor, positions: Tensor | None, layout: dict, *, return_hidden=False
) -> tuple[Tensor, dict[str, Any], Any, Tensor | None]:
    """(states at ``positions``, head kwargs, the model's own output or None, the real-token index or None)."""
    split = output_head(model)
    inputs, real, output = dict(input_ids=input_ids, position_ids=position_ids, **layout), None, None
    tokens = virtual_tokens(model)
    if tokens is not None:  # prompt/prefix tuning: virtual tokens in front of each sequence (models/virtual.py)
        inputs, real = packed_inputs(model, tokens, input_ids, position_ids, layout)
    with packed_attention(model):
        if split is not None:
            states = split.decoder(**inputs, use_cache=False).last_hidden_state[0]  # (S, H)
        else:
            base = model.get_base_model() if tokens is not None else model
            output = base(**inputs, use_cache=False, output_hidden_states=return_hidden)
            states = output.logits[0]  # (S, V): the model's own logits, read a chunk at a time
    if real is not None:
        states = states[real]
    if positions is not None:
        states = states[positions]
    head = {"head": None} if split is None else {"head": split.head, "scale": split.scale, "softcap": split.softcap}
    return states, head, output, real
