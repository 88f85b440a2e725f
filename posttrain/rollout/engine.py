"""Batched sampling with a KV cache and shared prompt prefill.

Legend: N prompts, G samples per prompt, B = N * G completions, T new tokens, V vocabulary.

The engine prefills each prompt *once*, then repeats its KV cache G times, so the G samples of a prompt share
the prompt's compute. It returns token ids, the log-probability of every sampled token under the sampling
distribution (logits / temperature, before top-k/top-p truncation: the distribution a trainer recomputes), and
why each completion ended. ``RolloutEngine`` is the interface every backend implements (the vLLM one lives in
``vllm_engine.py``); ``posttrain.rollout.factory.make_engine`` picks one by name.

    >>> from posttrain.models.loading import load_model
    >>> model, tok = load_model("builtin:tiny-base")
    >>> engine = HFEngine(model, tok)
    >>> prompt = tok.apply_chat_template([{"role": "user", "content": "Write in capitals: dog"}],
    ...                                  add_generation_prompt=True, tokenize=False)
    >>> out = engine.generate([prompt], SamplingParams(n=2, temperature=0.0, max_new_tokens=8), seed=0)
    >>> out.texts, out.finish_reasons
    (['DOG', 'DOG'], ['stop', 'stop'])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from posttrain.errors import ConfigError
from posttrain.models.varlen import decoding_attention
from posttrain.models.virtual import is_prompt_learning, prepare_cache, virtual_tokens
from posttrain.rollout.decode import lean_decoder


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature`` 0 means greedy; ``top_k`` 0 and ``top_p`` 1 mean no truncation;
    before ``min_new_tokens`` tokens EOS cannot be sampled (like top-k, a truncation: the returned log-probs stay
    those of the untruncated distribution)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()


@dataclass
class Rollouts:
    """B = N * G completions, grouped by prompt: completion i belongs to prompt ``prompt_index[i]``.

    completion_ids (B, T) long, padded; mask (B, T) bool, True = a generated token (EOS included);
    logps (B, T) float, 0 where not generated; texts (B) decoded without special tokens;
    finish_reasons (B): "stop" (EOS or a stop string) or "length"."""

    prompt_ids: list[list[int]]
    prompt_index: list[int]
    completion_ids: Tensor
    mask: Tensor
    logps: Tensor
    texts: list[str]
    finish_reasons: list[str]
    forward_passes: int = 0

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(-1)


class RolloutEngine(Protocol):
    """What RL trainers, search strategies and evaluation need from a generation backend.

    ``tokenizer`` is the HF tokenizer prompts are rendered with; ``Rollouts`` tensors live on the device of the
    trained model the engine was made for, so a trainer can score them without moving them."""

    tokenizer: Any

    def generate(self, prompts: list[str], params: SamplingParams, *, seed: int | list[int]) -> Rollouts:
        """Sample ``params.n`` completions for each prompt; the same seed gives the same samples. A list gives
        one seed per prompt, making each prompt's samples independent of the rest of the batch."""
        ...

    def update_weights(self, source: Any) -> None:
        """Make the engine sample from new weights: ``source`` is the trained model (same architecture) or a
        state dict of full tensors by parameter name (what an FSDP trainer gathers). The trainer calls it after
        every optimiser step; an engine sampling the trained model itself has nothing to do."""
        ...

    def decoding_model(self, purpose: str) -> Any:
        """The HF causal LM for token-level algorithms that drive its KV cache step by step (beam and tree
        search, through ``make_cache`` and ``sample_tokens``). A backend without one raises ``ConfigError``
        naming ``purpose`` (the config key that asked for it)."""
        ...


def sample_tokens(
    logits: Tensor, params: SamplingParams, generator: Any, *, banned: int | None = None
) -> tuple[Tensor, Tensor]:
    """Sample one token per row from (B, V) logits, never the ``banned`` id; returns (tokens (B,), their
    log-probs under logits / T, before any truncation). ``generator``: one ``torch.Generator`` for all rows, or
    a list of (row indices, generator) pairs covering the rows."""
    logits = logits.float()
    if params.temperature <= 0:
        pick = logits if banned is None else logits.index_fill(-1, torch.tensor([banned], device=logits.device), -1e30)
        tokens = pick.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits / params.temperature
    logps_all = torch.log_softmax(scaled, -1)
    filtered = scaled
    if banned is not None:
        filtered = filtered.index_fill(-1, torch.tensor([banned], device=filtered.device), float("-inf"))
    if params.top_k > 0:
        kth = torch.topk(filtered, min(params.top_k, filtered.shape[-1]), dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(filtered, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= params.top_p  # keep the smallest set reaching top_p
        filtered = filtered.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(filtered, -1)
    if isinstance(generator, torch.Generator):
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:  # one generator per group of rows: each group's draws do not depend on the other rows of the batch
        tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
        for rows, gen in generator:
            tokens[rows] = torch.multinomial(probs[rows], 1, generator=gen).squeeze(-1)
    return tokens, logps_all.gather(-1, tokens[:, None]).squeeze(-1)


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer that writes each step into buffers allocated once per generation call.

    ``DynamicLayer`` concatenates the new keys and values onto the old ones at every token, copying the whole
    cache each step; this layer copies only the new token's entries and hands out views of the filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self._keys = key_states.new_empty(b, h, self.capacity, d)
        self._values = value_states.new_empty(b, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _views(self) -> tuple[Tensor, Tensor]:
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]
        return self.keys, self.values

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.length + n > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded")
        self._keys[:, :, self.length : self.length + n] = key_states
        self._values[:, :, self.length : self.length + n] = value_states
        self.length += n
        return self._views()

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._views()

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._views()


def make_cache(model: Any, capacity: int) -> Any:
    """A preallocated KV cache for plain full-attention decoders; ``None`` (the model's default cache) for
    architectures with sliding-window or other layer types."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(config, "layer_types", None) or ["full_attention"]
    if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in types):
        return None
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(config.num_hidden_layers)])


@torch.no_grad()
def load_weights(target: Any, source: Any) -> None:
    """Copy ``source`` (a model with the same parameter names, or a state dict name -> tensor, possibly partial)
    into ``target``'s parameters and buffers, cast to their dtype and device. FSDP2 shards (DTensors) in a
    source model are gathered first, so every rank must call. A name ``target`` lacks is an error."""
    if isinstance(source, Mapping):
        weights = source
    else:
        weights = {**dict(source.named_parameters()), **dict(source.named_buffers())}
    own = {**dict(target.named_buffers()), **target.state_dict(keep_vars=True)}  # tied weights under every name
    unknown = [name for name in weights if name not in own]
    if unknown:
        raise KeyError(f"{len(unknown)} weights the rollout model does not have, e.g. {unknown[:3]}")
    for name, tensor in weights.items():
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):  # an FSDP2 shard
            tensor = tensor.full_tensor()
        own[name].copy_(tensor)


class HFEngine:
    """The built-in engine: any HF causal LM, KV cache, shared prefill, early exit when all rows finish.

    ``model`` is what it samples from: the trained model itself (then ``update_weights`` has nothing to do) or
    a separate copy, e.g. in bf16 or unsharded (``factory.make_engine`` makes it; then ``update_weights``
    copies the trained parameters in)."""

    def __init__(self, model: Any, tokenizer: Any, *, share_prefill: bool = True, lean: bool = True):
        """``lean``: decode Llama-architecture models with :class:`~posttrain.rollout.decode.LlamaDecodeStep`
        (bitwise the same logits, less overhead); False always calls the model."""
        self.model, self.tokenizer, self.share_prefill, self.lean = model, tokenizer, share_prefill, lean

    def update_weights(self, source: Any) -> None:
        """See ``RolloutEngine.update_weights``: a no-op when ``source`` is the model sampled from, else its
        parameters (and buffers) are copied in by name, cast to this model's dtype and device."""
        if source is self.model:
            return
        load_weights(self.model, source)

    def decoding_model(self, purpose: str) -> Any:
        """See ``RolloutEngine.decoding_model``: the model sampled from."""
        if is_prompt_learning(self.model):
            raise ConfigError(
                f"{purpose}: a prompt- or prefix-tuning adapter decodes only through the rollout engine (strategies"
                " greedy, sample, best_of_n, self_consistency); merge cannot fold it either: use a LoRA-family adapter"
            )
        return self.model

    def _prefill(self, prompt_ids: list[list[int]], max_new_tokens: int) -> tuple[Tensor, Tensor, Any]:
        """Left-padded prefill: (last-position logits (N, V), attention mask (N, P), cache). A prompt-learning
        adapter's V virtual tokens go in front of the padding (its ones lead the mask; positions start after
        them), as embeddings (prompt tuning) or as the cache's first V entries (prefix tuning)."""
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompt_ids)
        device = next(self.model.parameters()).device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
        tokens = virtual_tokens(self.model)
        v = tokens.count if tokens is not None else 0
        cache = make_cache(self.model, v + width + max_new_tokens)
        inputs: dict[str, Tensor] = {"input_ids": ids}
        if tokens is not None:
            attn = torch.cat([torch.ones_like(attn[:, :v]), attn], dim=-1)
            if tokens.embeds is not None:
                embeds = self._model.get_input_embeddings()(ids)
                prompt = tokens.embeds.to(embeds.dtype).expand(len(prompt_ids), -1, -1)
                inputs = {"inputs_embeds": torch.cat([prompt, embeds], dim=1)}
            else:
                cache = prepare_cache(self.model, tokens, cache, len(prompt_ids))
        pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, -(inputs.get("inputs_embeds", ids).shape[1]) :]
        out = self._model(**inputs, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.logits[:, -1], attn, out.past_key_values

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams, *, seed: int | list[int]) -> Rollouts:
        """See ``RolloutEngine.generate``. Prompts are text (chat template already applied). ``seed`` may be one
        seed per prompt: then each prompt's samples depend only on its own seed, not on the rest of the batch
        (so a batch split over ranks samples what the whole batch samples in one process)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with decoding_attention(self.model):
                return self._generate(prompts, params, seed)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams, *, seed: int | list[int]) -> Rollouts:
        """``generate`` from prompts already tokenised (e.g. the prompt part of a training example, which a
        decode and re-encode might not reproduce token for token)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with decoding_attention(self.model):
                return self._generate_ids(prompt_ids, params, seed)
        finally:
            self.model.train(was_training)

    def _generate(self, prompts: list[str], params: SamplingParams, seed: int | list[int]) -> Rollouts:
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self._generate_ids(prompt_ids, params, seed)

    def _generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams, seed: int | list[int]) -> Rollouts:
        tok = self.tokenizer
        # peft's forward would add a prompt-learning adapter's virtual tokens at every step: decode with the base
        # model, the virtual tokens put in once by _prefill.
        self._model = self.model.get_base_model() if is_prompt_learning(self.model) else self.model
        g = params.n
        prompt_index = [i for i in range(len(prompt_ids)) for _ in range(g)]
        if self.share_prefill:
            logits, attn, cache = self._prefill(prompt_ids, params.max_new_tokens)
            # The G samples of a prompt reuse its prefill: repeat the cache rows instead of recomputing them.
            logits, attn = logits.repeat_interleave(g, 0), attn.repeat_interleave(g, 0)
            cache.batch_repeat_interleave(g)
            passes = 1
        else:
            logits, attn, cache = self._prefill([prompt_ids[i] for i in prompt_index], params.max_new_tokens)
            passes = 1
        b, device = len(prompt_index), logits.device
        per_prompt = not isinstance(seed, int)
        if per_prompt:
            if len(seed) != len(prompt_ids):
                raise ValueError(f"{len(seed)} seeds for {len(prompt_ids)} prompts")
            gens = [torch.Generator(device=device).manual_seed(s) for s in seed]
            generator_rows: list[int] = []
        else:
            generator = torch.Generator(device=device).manual_seed(seed)
        eos = tok.eos_token_id
        tokens = torch.full((b, params.max_new_tokens), tok.pad_token_id, dtype=torch.long, device=device)
        logps = torch.zeros(b, params.max_new_tokens, device=device)
        mask = torch.zeros(b, params.max_new_tokens, dtype=torch.bool, device=device)
        finish = ["length"] * b
        active = torch.arange(b, device=device)  # rows still generating, in cache order
        positions = attn.sum(-1)
        # The same computation as self._model(...) without transformers' per-call machinery, where it is exact.
        own_cache = cache is not None and all(type(layer) is PreallocatedLayer for layer in cache.layers)
        step = lean_decoder(self._model, cache) if own_cache and self.lean else None
        for t in range(params.max_new_tokens):
            banned = eos if t < params.min_new_tokens else None
            if per_prompt and (t == 0 or len(generator_rows) != len(active)):  # recomputed when rows finish
                generator_rows = active.tolist()
                owners = [prompt_index[r] for r in generator_rows]
                groups: dict[int, list[int]] = {}
                for place, owner in enumerate(owners):
                    groups.setdefault(owner, []).append(place)
                generator = [(torch.tensor(rows, device=device), gens[o]) for o, rows in groups.items()]
            new, new_logps = sample_tokens(logits, params, generator, banned=banned)
            tokens[active, t], logps[active, t], mask[active, t] = new, new_logps, True
            done = new == eos
            if params.stop and t + 1 >= params.min_new_tokens:
                done |= self._hit_stop(tokens, mask, active, params.stop)
            for row in active[done].tolist():
                finish[row] = "stop"
            keep = ~done
            if not keep.any() or t == params.max_new_tokens - 1:
                break
            if not keep.all():
                # Finished rows leave the batch: their cache rows are dropped, so no compute is spent on them.
                idx = keep.nonzero().squeeze(-1)
                active, new, attn, positions = active[idx], new[idx], attn[idx], positions[idx]
                cache.batch_select_indices(idx)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
            if step is not None:
                logits = step(new, attn, positions)
            else:
                out = self._model(
                    input_ids=new[:, None],
                    attention_mask=attn,
                    position_ids=positions[:, None],
                    past_key_values=cache,
                    use_cache=True,
                )
                logits, cache = out.logits[:, -1], out.past_key_values
            positions = positions + 1
            passes += 1
        width = int(mask.sum(-1).max()) if mask.any() else 0
        tokens, logps, mask = tokens[:, :width], logps[:, :width], mask[:, :width]
        texts = [tok.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(tokens, mask)]
        return Rollouts(prompt_ids, prompt_index, tokens, mask, logps, texts, finish, passes)

    def _hit_stop(self, tokens: Tensor, mask: Tensor, active: Tensor, stop: tuple[str, ...]) -> Tensor:
        hits = []
        for row in active.tolist():
            text = self.tokenizer.decode(tokens[row][mask[row]].tolist(), skip_special_tokens=True)
            hits.append(any(s in text for s in stop))
        return torch.tensor(hits, device=tokens.device)
