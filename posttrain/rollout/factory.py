"""Choose a rollout engine by name (``rollout_engine: hf | vllm``); everything that generates goes through here.

- ``hf`` (default, everywhere): ``HFEngine`` on the trained model itself, or on a separate copy when
  ``dtype`` asks for another precision (a bf16 rollout copy of an fp32 model) or ``copy=True`` (an unsharded
  copy taken before FSDP2 shards the trained model). ``update_weights`` is then a no-op, or copies the new
  parameters into the copy.
- ``vllm`` (optional extra ``posttrain[vllm]``, NVIDIA GPU only): ``VLLMEngine`` from ``vllm_engine.py``; vLLM is
  imported only when this kind is chosen. Without vLLM or without CUDA, asking for it is a ``ConfigError`` that
  says what to install.

A trainer's whole contract with an engine:

    engine = make_engine(cfg.rollout_engine, model, tokenizer, dtype=cfg.rollout_dtype)
    rollouts = engine.generate(prompts, params, seed=step_seed)   # sample
    ...                                                           # score, optimiser step
    engine.update_weights(model)   # or a state dict of full tensors gathered from FSDP shards

    >>> from posttrain.models.loading import load_model
    >>> model, tok = load_model("builtin:tiny-base")
    >>> engine = make_engine("hf", model, tok, dtype="bfloat16")
    >>> type(engine).__name__, engine.model is model, next(engine.model.parameters()).dtype
    ('HFEngine', False, torch.bfloat16)
    >>> make_engine("sglang", model, tok)
    Traceback (most recent call last):
    ...
    posttrain.errors.ConfigError: rollout_engine: unknown engine 'sglang' (choose one of hf, vllm)
"""

from __future__ import annotations

import copy as copying
import importlib.util
from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.models.virtual import is_prompt_learning
from posttrain.rollout.engine import HFEngine, RolloutEngine

ENGINES = ("hf", "vllm")
OPTIONS = {
    "hf": {"share_prefill", "copy"},
    "vllm": {"copy", "model_path", "gpu_memory_utilization", "max_model_len", "enforce_eager", "llm_kwargs"},
}
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# What a GPU user installs (also in vllm_engine.py's docstring and the comment on the extra in pyproject.toml).
VLLM_INSTALL = (
    "on a Linux machine with an NVIDIA GPU, install the CUDA build of torch 2.13.0 first (PyPI's default Linux"
    ' wheel), then `pip install "posttrain[vllm]"` (vLLM 0.32.x; it pins transformers < 5.20)'
)


def make_engine(kind: str, model: Any, tokenizer: Any, *, dtype: str = "auto", **options: Any) -> RolloutEngine:
    """The rollout engine ``kind`` (``hf`` or ``vllm``) for ``model`` (the trained HF model) and ``tokenizer``.

    ``dtype`` is the precision rollouts are sampled in (``auto``: the model's own). Options: ``copy`` (bool:
    sample from a separate copy even in the same dtype, as an FSDP2 trainer needs; vLLM always has its own), for
    ``hf`` also ``share_prefill`` (bool), for ``vllm`` those of ``VLLMEngine``. An unknown kind, dtype or option
    is a ``ConfigError`` naming the key; so is ``vllm`` where it cannot run (no CUDA GPU, vLLM not installed)."""
    if kind not in ENGINES:
        raise ConfigError(f"rollout_engine: unknown engine {kind!r} (choose one of {', '.join(ENGINES)})")
    if dtype not in DTYPES:
        raise ConfigError(f"rollout_dtype: unknown dtype {dtype!r} (choose one of {', '.join(DTYPES)})")
    unknown = sorted(set(options) - OPTIONS[kind])
    if unknown:
        known = ", ".join(sorted(OPTIONS[kind]))
        raise ConfigError(f"rollout_engine: the {kind} engine has no option {unknown[0]!r} ({known})")
    if kind == "hf":
        sampled = rollout_model(model, dtype, copy=options.pop("copy", False))
        return HFEngine(sampled, tokenizer, **options)
    if is_prompt_learning(model):
        raise ConfigError(
            "rollout_engine: vllm samples from merged weights, and a prompt/prefix adapter has none to merge: use hf"
        )
    reason = vllm_unavailable()
    if reason:
        raise ConfigError(f"rollout_engine: vllm cannot run here: {reason}; {VLLM_INSTALL}, or use hf")
    from posttrain.rollout.vllm_engine import VLLMEngine

    options.pop("copy", None)  # vLLM always samples from weights of its own
    return VLLMEngine(model, tokenizer, dtype=dtype, **options)


def engine_for(engine: str | RolloutEngine, model: Any, tokenizer: Any) -> RolloutEngine:
    """``engine`` itself when it is an engine, else ``make_engine(engine, model, tokenizer)``: how search and
    evaluation accept either a kind or an engine the caller already holds (a vLLM engine is costly to start)."""
    return make_engine(engine, model, tokenizer) if isinstance(engine, str) else engine


def rollout_model(model: Any, dtype: str = "auto", *, copy: bool = False) -> Any:
    """The model an HF engine samples from: ``model`` itself, or a frozen eval-mode copy in ``dtype`` (always a
    copy with ``copy``). Take the copy before FSDP2 shards ``model``, so that it stays whole."""
    want = DTYPES[dtype]
    if not copy and (want is None or next(model.parameters()).dtype == want):
        return model
    twin = copying.deepcopy(model)
    if want is not None:
        twin = twin.to(want)
    return twin.eval().requires_grad_(False)


def vllm_unavailable() -> str | None:
    """Why the vLLM engine cannot run in this process (no CUDA device, vLLM not installed), or None. Imports
    nothing from vLLM."""
    reasons = []
    if not torch.cuda.is_available():
        build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        reasons.append(f"it needs an NVIDIA GPU and torch {torch.__version__} ({build}) sees none")
    if importlib.util.find_spec("vllm") is None:
        reasons.append("the vllm package is not installed")
    return " and ".join(reasons) or None
