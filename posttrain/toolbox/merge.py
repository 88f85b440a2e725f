"""Model merging: linear, SLERP, task arithmetic, TIES and DARE over full weights, written as a plain HF model.

Inputs are full models or adapters (each folded into its base first, so TIES/DARE act on exact full-weight task
vectors, not on the two LoRA factors separately as peft's ``add_weighted_adapter`` does). The task-vector maths
(trim, sign election, disjoint mean, random drop and rescale) is peft's own (``peft.utils.merge_utils``, a
dependency already); SLERP and the linear average are the few lines peft lacks, following mergekit's
definitions. Names used below: K models, one tensor at a time.

- ``linear``: sum_k w_k θ_k / sum_k w_k (weights default to equal).
- ``slerp``: two models, ``t`` in [0, 1] (0 gives A, 1 gives B): the angle between the two tensors' directions
  interpolated, applied to the tensors themselves; (nearly) parallel or zero tensors fall back to linear.
- ``task_arithmetic``: base + sum_k w_k (θ_k - base) (weights default to 1).
- ``ties``: each task vector keeps its ``density`` fraction of largest-magnitude entries, the sign of the
  entry-wise sum elects a sign, and the weighted entries that agree with it are averaged (peft: divided by the
  count of agreeing models).
- ``dare_linear`` / ``dare_ties``: each task vector drops entries at random (keep probability ``density``, seeded
  by ``seed`` and the tensor's name) and rescales the kept ones by 1/density; then summed, or TIES-combined.

    >>> import torch
    >>> slerp(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    tensor([0.7071, 0.7071])
    >>> merge_tensors("ties", [torch.tensor([1.0, -2.0]), torch.tensor([-3.0, 1.0])], base=torch.zeros(2),
    ...               weights=[1.0, 1.0], density=1.0)
    tensor([-3., -2.])
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.errors import ConfigError, ModelError
from posttrain.toolbox import MERGE_METHODS

METHODS = MERGE_METHODS
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
# Config keys that decide how the weights are read: two models that differ in one of these cannot be merged even
# where every tensor has the same shape (4 heads of 32 vs 8 heads of 16 share all shapes).
STRUCTURE_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "hidden_act",
    "tie_word_embeddings",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
)


def slerp(t: float, v0: Tensor, v1: Tensor, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical linear interpolation between two tensors of one shape (mergekit's definition).

    The angle θ between the flattened tensors' unit directions gives the coefficients sin((1-t)θ)/sin θ and
    sin(tθ)/sin θ, applied to the tensors as they are; where the directions are (anti)parallel beyond
    ``dot_threshold`` or a tensor is ~zero, it is the linear (1-t)·v0 + t·v1. Computed in float64.

    >>> slerp(0.5, torch.tensor([2.0, 0.0]), torch.tensor([4.0, 0.0]))
    tensor([3., 0.])
    """
    a, b = v0.double().flatten(), v1.double().flatten()
    na, nb = a.norm(), b.norm()
    if na < eps or nb < eps:
        return torch.lerp(a, b, t).reshape(v0.shape).to(v0.dtype)
    dot = float(((a / na) @ (b / nb)).clamp(-1.0, 1.0))
    if abs(dot) > dot_threshold:
        return torch.lerp(a, b, t).reshape(v0.shape).to(v0.dtype)
    theta = math.acos(dot)
    s0 = math.sin((1.0 - t) * theta) / math.sin(theta)
    s1 = math.sin(t * theta) / math.sin(theta)
    return (s0 * a + s1 * b).reshape(v0.shape).to(v0.dtype)


def linear(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """The weighted mean sum_k w_k x_k / sum_k w_k.

    >>> linear([torch.tensor([1.0]), torch.tensor([4.0])], [2.0, 1.0])
    tensor([2.])
    """
    total = sum(weights)
    if abs(total) < 1e-12:
        raise ConfigError(f"merge.weights: {weights} sum to 0; a weighted mean needs a non-zero sum")
    return sum(w * x.float() for w, x in zip(weights, tensors, strict=True)) / total


def merge_tensors(
    method: str,
    tensors: list[Tensor],
    *,
    weights: list[float],
    base: Tensor | None = None,
    t: float = 0.5,
    density: float = 1.0,
    seed: int = 0,
) -> Tensor:
    """One merged tensor from K tensors of one shape (float32 result; see the module docstring per method).

    >>> merge_tensors("task_arithmetic", [torch.tensor([3.0]), torch.tensor([5.0])], base=torch.tensor([1.0]),
    ...               weights=[1.0, 0.5])
    tensor([5.])
    """
    from peft.utils import merge_utils

    if method == "linear":
        return linear(tensors, weights)
    if method == "slerp":
        return slerp(t, tensors[0].float(), tensors[1].float())
    if base is None:
        raise ConfigError(f"merge.base: {method} merges task vectors (model - base) and needs a base model")
    deltas = [x.float() - base.float() for x in tensors]
    w = torch.tensor(weights, dtype=torch.float32)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        torch.manual_seed(seed)  # DARE's drops come from the global generator inside peft: seed it, then restore
        if method == "task_arithmetic":
            delta = merge_utils.task_arithmetic(deltas, w)
        elif method == "ties":
            delta = merge_utils.ties(deltas, w, density)
        elif method == "dare_linear":
            delta = merge_utils.dare_linear(deltas, w, density)
        elif method == "dare_ties":
            delta = merge_utils.dare_ties(deltas, w, density)
        else:
            raise ConfigError(f"merge.method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return base.float() + delta


def check_merge_args(
    method: str, models: list[str], *, weights: list[float] | None, t: float, base: str | None, density: float | None
) -> None:
    """Refuse arguments that cannot make a sensible merge, naming the flag."""
    if method not in METHODS:
        raise ConfigError(f"merge.method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if len(models) < 2:
        raise ConfigError(f"merge.models: {method} needs two or more models, got {len(models)}")
    if method == "slerp" and len(models) != 2:
        raise ConfigError(f"merge.models: slerp interpolates between exactly two models, got {len(models)}")
    if method == "slerp" and not 0.0 <= t <= 1.0:
        raise ConfigError(f"merge.t: {t} is outside [0, 1] (0 gives the first model, 1 the second)")
    if weights is not None and len(weights) != len(models):
        raise ConfigError(f"merge.weights: {len(weights)} weights for {len(models)} models; give one per model")
    if method == "slerp" and weights is not None:
        raise ConfigError("merge.weights: slerp takes --t, not weights")
    if method not in TASK_VECTOR_METHODS and base is not None:
        raise ConfigError(f"merge.base: {method} does not use a base model; task-vector methods do")
    if density is not None and method not in DENSITY_METHODS:
        raise ConfigError(f"merge.density: only {', '.join(DENSITY_METHODS)} use a density, not {method}")
    if density is not None and not 0.0 < density <= 1.0:
        raise ConfigError(f"merge.density: {density} is outside (0, 1] (the fraction of each task vector kept)")


def _tensor_seed(seed: int, name: str) -> int:
    """DARE's drop seed for one tensor: the same for a name whatever the merge order, different across tensors."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def load_full(spec: str) -> tuple[Any, Any]:
    """(model in float32 with any adapter folded in, tokenizer): what the tools work on. Prompt adapters have
    nothing to fold and are refused."""
    from posttrain.models.loading import adapter_type, load_model, resolve
    from posttrain.models.quant import quantization_of

    kind = adapter_type(resolve(spec))
    if quantization_of(resolve(spec)) is not None:
        raise ModelError(f"{spec}: a quantized model; the tools work on full-precision weights: use the original")
    if kind in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        raise ModelError(f"{spec}: a {kind.lower()} adapter adds virtual tokens and has no weights to merge")
    model, tokenizer = load_model(spec, dtype="float32")
    if kind is not None:
        model = model.merge_and_unload()
    return model, tokenizer


def _adapter_base(spec: str) -> str | None:
    from posttrain.models.loading import is_adapter, resolve

    path = resolve(spec)
    if not is_adapter(path):
        return None
    return json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")


def check_compatible(names: list[str], models: list[Any], tokenizers: list[Any]) -> None:
    """Refuse models that differ in structure, parameter names, shapes or vocabulary (no garbled merge)."""
    first, first_config = names[0], models[0].config.to_dict()
    first_shapes = {k: tuple(v.shape) for k, v in models[0].state_dict().items()}
    first_vocab = tokenizers[0].get_vocab()
    for name, model, tokenizer in zip(names[1:], models[1:], tokenizers[1:], strict=True):
        config = model.config.to_dict()
        for key in STRUCTURE_KEYS:
            if config.get(key) != first_config.get(key):
                raise ModelError(
                    f"merge: {name} and {first} differ in architecture: config {key!r} is {config.get(key)!r} vs "
                    f"{first_config.get(key)!r}; only models of one architecture can be merged"
                )
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if shapes.keys() != first_shapes.keys():
            extra = sorted(shapes.keys() ^ first_shapes.keys())[:3]
            raise ModelError(f"merge: {name} and {first} have different parameters (e.g. {', '.join(extra)})")
        for key, shape in shapes.items():
            if shape != first_shapes[key]:
                raise ModelError(
                    f"merge: {key} has shape {list(shape)} in {name} but {list(first_shapes[key])} in {first}"
                )
        if tokenizer.get_vocab() != first_vocab:
            raise ModelError(
                f"merge: {name} and {first} have different tokenizers (vocabularies differ); token ids would"
                " not mean the same thing in the merged model"
            )


def merge_models(
    method: str,
    models: list[str],
    out: str | Path,
    *,
    weights: list[float] | None = None,
    t: float = 0.5,
    base: str | None = None,
    density: float | None = None,
    seed: int = 0,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Merge ``models`` (full models or adapters, one architecture and tokenizer) into a plain HF model in ``out``.

    A task-vector method without ``base`` uses the adapters' common base when every input is an adapter on one
    base. The output holds ``merge.json`` (method, inputs, settings) next to the weights and the first model's
    tokenizer and chat template; the return value is that record.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> merge_models("linear", ["builtin:tiny-base", "builtin:tiny-base"], f"{d}/m")["method"]
    'linear'
    """
    from posttrain.models.loading import DTYPES, save_model_dir

    check_merge_args(method, models, weights=weights, t=t, base=base, density=density)
    if dtype not in DTYPES:
        raise ConfigError(f"merge.dtype: unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if method in TASK_VECTOR_METHODS and base is None:
        bases = {_adapter_base(m) for m in models}
        if len(bases) != 1 or None in bases:
            raise ConfigError(
                f"merge.base: {method} merges task vectors (model - base): pass --base (the model the inputs were"
                " fine-tuned from); it defaults to the adapters' base only when every input is an adapter on one base"
            )
        base = bases.pop()
    weights = weights if weights is not None else [1.0] * len(models)  # linear divides by their sum
    density = 1.0 if density is None else density
    loaded = [load_full(spec) for spec in [*models, *([base] if base else [])]]
    names = [*models, *([base] if base else [])]
    check_compatible(names, [m for m, _ in loaded], [tok for _, tok in loaded])
    target, tokenizer = loaded[0]
    states = [m.state_dict() for m, _ in loaded[: len(models)]]
    base_state = loaded[-1][0].state_dict() if base else None
    merged, done = {}, {}  # done: storage of a tied tensor -> its merged value (merged once, shared again)
    for name, tensor in states[0].items():
        if not tensor.is_floating_point():
            merged[name] = tensor
            continue
        if tensor.data_ptr() in done:
            merged[name] = done[tensor.data_ptr()]
            continue
        value = merge_tensors(
            method,
            [s[name] for s in states],
            weights=weights,
            base=base_state[name] if base_state is not None else None,
            t=t,
            density=density,
            seed=_tensor_seed(seed, name),
        )
        merged[name] = done[tensor.data_ptr()] = value.to(DTYPES[dtype])
    target.load_state_dict(merged)
    target.to(DTYPES[dtype])
    record = {
        "method": method,
        "models": models,
        "weights": weights,
        "base": base,
        **({"t": t} if method == "slerp" else {}),
        **({"density": density} if method in DENSITY_METHODS else {}),
        **({"seed": seed} if method.startswith("dare") else {}),
        "dtype": dtype,
        "tokenizer_from": models[0],
    }
    save_model_dir(target, tokenizer, Path(out), extra_files={"merge.json": json.dumps(record, indent=1) + "\n"})
    return record
