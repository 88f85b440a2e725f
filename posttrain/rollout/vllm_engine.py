"""The vLLM rollout engine (optional extra ``posttrain[vllm]``, NVIDIA GPU only), behind the ``RolloutEngine``
interface of ``engine.py``. Only ``factory.make_engine("vllm", ...)`` imports this module, and vLLM itself is
imported when an engine is built, so the rest of the package never needs it.

Install (Linux, NVIDIA GPU; in a fresh venv, not the Makefile's, which holds the CPU build of torch):

    pip install "torch==2.13.0"      # from PyPI: on Linux x86_64 that is the CUDA 13.0 build
    pip install -e ".[vllm]"         # vLLM 0.32.x and its CUDA libraries; transformers becomes 5.19.x (< 5.20)

With the CPU build already installed, pip keeps it (2.13.0+cpu satisfies vLLM's torch==2.13.0) and vLLM cannot
start; vLLM 0.33 needs torch 2.14, outside this package's range. Without a GPU or without vLLM, choosing this
engine is a ``ConfigError`` saying so.

How it maps onto vLLM's offline ``LLM`` API (checked against vLLM 0.32's source):

- The model: ``VLLMEngine`` saves the trained HF model (LoRA adapters merged) and its tokenizer as safetensors to
  a temporary directory and starts ``LLM`` from it, then deletes the directory; or it starts from ``model_path``
  (an HF model dir holding the same weights) when given. vLLM runs in this process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), on the current CUDA device, next to the trainer: keep
  ``gpu_memory_utilization`` low enough to leave the trainer its memory.
- Sampling: prompts go in as token ids from our tokenizer (as in ``HFEngine``); ``SamplingParams`` map one to one
  (``n``, ``temperature`` (0 = greedy), ``top_p``, ``top_k`` (0 = off), ``max_new_tokens`` -> ``max_tokens``,
  ``min_new_tokens`` -> ``min_tokens``, ``stop``); the ``seed`` of ``generate`` (one, or one per prompt) gives
  each prompt its own request seed (vLLM then seeds the n samples of a request ``seed + i``), so a seed gives
  the same samples. (The same seed does not give the same samples as ``HFEngine``: the generators differ.)
  Completions keep their EOS token (mask True), texts are decoded by our tokenizer without special tokens.
- Log-probs: ``logprobs=0`` returns the sampled token's log-prob, under ``logprobs_mode="processed_logprobs"``:
  the distribution after temperature, as ``HFEngine`` and the trainer compute it (vLLM's default
  ``raw_logprobs`` ignores the temperature). Where a truncation is active — ``top_k``, ``top_p`` < 1, or EOS
  banned before ``min_new_tokens`` — vLLM reports the log-prob renormalised over the kept tokens, while
  ``HFEngine`` reports the untruncated one; greedy and untruncated sampling agree up to kernel numerics. The
  trainers recompute log-probs anyway and log the largest gap.
- Weight updates: ``update_weights`` hands (name, full tensor) pairs — HF parameter names, LoRA merged — to the
  vLLM model's ``load_weights`` (through ``LLM.apply_model``, in process, no copy through serialisation) and
  resets vLLM's prefix cache, whose keys and values belong to the old weights. The in-process engine is what
  makes this work: a vLLM engine started earlier in the same process with multiprocessing on would not.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.errors import ConfigError
from posttrain.rollout.engine import Rollouts, SamplingParams

LOGPROBS_MODE = "processed_logprobs"


class VLLMEngine:
    """Rollouts from vLLM; see the module docstring for what maps to what.

    Options (through ``make_engine("vllm", model, tokenizer, dtype=..., **options)``): ``model_path`` (start from
    this HF model dir instead of saving ``model``), ``gpu_memory_utilization`` (share of the GPU vLLM takes for
    weights and KV cache, default 0.3, the rest stays with the trainer), ``max_model_len``, ``enforce_eager``,
    and ``llm_kwargs`` (any other ``vllm.LLM`` argument)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        dtype: str = "auto",
        model_path: str | None = None,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        llm_kwargs: dict[str, Any] | None = None,
    ):
        # The engine core and its worker live in this process, so weight updates pass tensors by reference.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        if dtype == "auto":
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": enforce_eager,
            "logprobs_mode": LOGPROBS_MODE,
            "seed": 0,
            **({"max_model_len": max_model_len} if max_model_len else {}),
            **(llm_kwargs or {}),
        }
        if model_path is not None:
            self.llm = LLM(model=str(model_path), **kwargs)
        else:
            with tempfile.TemporaryDirectory(prefix="posttrain-vllm-") as tmp:
                save_plain(model, tokenizer, Path(tmp) / "model")
                self.llm = LLM(model=str(Path(tmp) / "model"), **kwargs)

    def generate(self, prompts: list[str], params: SamplingParams, *, seed: int | list[int]) -> Rollouts:
        """See ``RolloutEngine.generate`` (one seed, or one per prompt)."""
        tok = self.tokenizer
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        requests = [vllm_params(params, seed=s) for s in request_seeds(seed, len(prompts), params.n)]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], requests, use_tqdm=False)
        ids, logps, finish = [], [], []
        for out in outputs:
            for sample in sorted(out.outputs, key=lambda c: c.index):
                tokens = list(sample.token_ids)
                ids.append(tokens)
                logps.append([position[t].logprob for t, position in zip(tokens, sample.logprobs or [])])
                finish.append("stop" if sample.finish_reason == "stop" else "length")
        return to_rollouts(prompt_ids, params.n, ids, logps, finish, tok, self.device)

    def update_weights(self, source: Any) -> None:
        """See ``RolloutEngine.update_weights``: ``source`` is the trained model or a state dict of full tensors
        with HF parameter names (e.g. ``Parallel.full_state(trainable_only=False)``)."""
        if isinstance(source, Mapping):
            self._load(list(source.items()))
        else:
            with hf_weights(source) as weights:
                self._load(list(weights))
        self.llm.reset_prefix_cache()

    def _load(self, weights: list[tuple[str, Tensor]]) -> None:
        self.llm.apply_model(lambda model: model.load_weights(weights))

    def decoding_model(self, purpose: str) -> Any:
        """vLLM does not hand out its model's KV cache token by token."""
        raise ConfigError(
            f"{purpose}: beam and tree search drive the model's KV cache token by token, which the vllm engine"
            " does not expose; use the hf engine for them"
        )


def vllm_params(params: SamplingParams, *, seed: int) -> Any:
    """vLLM ``SamplingParams`` for ours (one request; ``logprobs=0``: the sampled token's log-prob)."""
    from vllm import SamplingParams as VLLMSamplingParams

    greedy = params.temperature <= 0
    return VLLMSamplingParams(
        n=params.n,
        temperature=0.0 if greedy else params.temperature,
        top_p=1.0 if greedy else params.top_p,
        top_k=0 if greedy else max(params.top_k, 0),
        max_tokens=params.max_new_tokens,
        min_tokens=params.min_new_tokens,
        stop=list(params.stop) or None,
        include_stop_str_in_output=True,
        seed=seed,
        logprobs=0,
    )


def request_seeds(seed: int | list[int], prompts: int, n: int) -> list[int]:
    """The vLLM request seed of each prompt. vLLM seeds a request's ``n`` samples ``seed + i``, so with one
    ``seed`` consecutive prompts are ``n`` apart; with one seed per prompt each request's seed depends on its
    own seed alone (samples independent of the rest of the batch). No two samples share a seed (given distinct
    per-prompt seeds)."""
    if isinstance(seed, int):
        return [(seed * 1_000_003 + i * max(n, 1)) % 2**63 for i in range(prompts)]
    if len(seed) != prompts:
        raise ValueError(f"{len(seed)} seeds for {prompts} prompts")
    return [(s * 1_000_003) % 2**63 for s in seed]


def to_rollouts(
    prompt_ids: list[list[int]],
    n: int,
    ids: list[list[int]],
    logps: list[list[float]],
    finish: list[str],
    tokenizer: Any,
    device: torch.device,
) -> Rollouts:
    """Padded ``Rollouts`` from per-completion token ids and log-probs (prompt-major, ``n`` per prompt)."""
    b = len(ids)
    width = max((len(row) for row in ids), default=0)
    tokens = torch.full((b, width), tokenizer.pad_token_id, dtype=torch.long)
    values = torch.zeros(b, width)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for i, (row, row_logps) in enumerate(zip(ids, logps)):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        values[i, : len(row_logps)] = torch.tensor(row_logps, dtype=torch.float32)
        mask[i, : len(row)] = True
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    prompt_index = [i for i in range(len(prompt_ids)) for _ in range(n)]
    # One prefill plus one decoding step per token of the longest completion (vLLM batches them all).
    passes = max(width, 1)
    return Rollouts(
        prompt_ids, prompt_index, tokens.to(device), mask.to(device), values.to(device), texts, finish, passes
    )


@contextmanager
def hf_weights(model: Any) -> Iterator[Iterable[tuple[str, Tensor]]]:
    """(HF name, full tensor) for every parameter of ``model`` as a plain HF checkpoint names it: FSDP2 shards
    gathered (every rank must enter), LoRA adapters merged into the base weights for the duration."""
    merged = hasattr(model, "merge_adapter")
    with torch.no_grad():
        if merged:
            model.merge_adapter()
        try:
            yield _plain_parameters(model, peft=merged)
        finally:
            if merged:
                model.unmerge_adapter()


def _plain_parameters(model: Any, *, peft: bool) -> list[tuple[str, Tensor]]:
    out = []
    for name, p in model.named_parameters():
        if peft:
            if "lora_" in name or "ia3_" in name or "original_module" in name:
                continue  # adapter weights are merged into the base ones; vLLM has no such parameters
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            name = name.replace("modules_to_save.default.", "")
        t = p.detach()
        out.append((name, t.full_tensor() if hasattr(t, "full_tensor") else t))
    return out


def save_plain(model: Any, tokenizer: Any, out: Path) -> None:
    """Save ``model`` (LoRA adapters merged, in a copy) with its tokenizer as a plain HF safetensors dir."""
    from posttrain.models.loading import save_model_dir

    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    save_model_dir(model, tokenizer, out)
