"""Pruning: unstructured (magnitude, Wanda), 2:4 semi-structured, and structured removal of attention heads or MLP
channels, with an optional short recovery fine-tune; the result is a plain HF model directory.

What is pruned: the ``nn.Linear`` layers inside the decoder blocks (``model.model.layers``: q/k/v/o and
gate/up/down in a Llama), never the embeddings or the output head. Names used below: a weight W is (out, in); X
is the (tokens, in) input of its layer over the calibration rows; ``input_sumsq`` is sum_t X_tj^2 per input
feature j, collected by forward hooks in one no-grad pass per calibration row.

- ``magnitude``: score |W_ij|; the ``floor(sparsity · numel)`` lowest scores of each weight matrix are zeroed.
- ``wanda`` (Sun et al. 2023): score |W_ij| · ||X_j||_2, compared within each output row (the paper's
  per-output group): the ``floor(sparsity · in)`` lowest of every row are zeroed. Needs ``calibration`` rows.
- ``2:4``: in every group of 4 consecutive input weights of a row the 2 highest scores are kept (the Wanda score
  when calibration rows are given, else |W|); the sparsity is 0.5 by definition (the pattern sparse tensor cores
  run). Input sizes must be multiples of 4.
- ``structured="heads"``: removes ``floor(sparsity · n)`` of the n KV groups of every layer (a KV head with the
  query heads that read it, so grouped-query attention stays valid; without GQA a group is one head), at least
  one kept, the same number in every layer (one config describes all layers) but each layer its own choice.
  q/k/v rows and o_proj columns are sliced out; the config gets the new head counts and an explicit
  ``head_dim``. A group's score is ||o_proj columns of its heads||_F times ||v_proj rows of its KV head||_F
  (``magnitude``) or times the norm of its heads' attention output over the calibration tokens (``wanda``).
- ``structured="mlp"``: removes intermediate channels the same way (gate/up rows, down_proj columns; the config's
  ``intermediate_size``). A channel's score is ||down_proj[:, c]|| times ||gate[c]||·||up[c]|| (``magnitude``)
  or times the norm of its activation act(gate x)·(up x) over the calibration tokens (``wanda``).

A removed head or channel contributes nothing beyond its o_proj/down_proj columns, so the smaller model computes
exactly what the original computes with those columns zeroed (``tests/test_prune.py`` checks the logits).

Recovery (``recover_steps`` > 0) is a short SFT through the normal scaffold (``posttrain.train.sft.LMStage``) on
``recover_data``. Each pruned weight's gradient is multiplied by its keep-mask: a zero gradient leaves AdamW's
moments and the update at zero (weight decay is a multiple of the weight, 0), so pruned weights stay exactly 0.
The run happens in a temporary directory beside ``out``; its loss curve is kept as ``recover_metrics.jsonl``.

Adapters are folded into their base first (prompt adapters have no weights and are refused). The record (method,
per-layer sparsity reached, parameters before and after, for structured the heads or channels kept per layer) is
returned and written as ``prune.json`` beside the weights. From the command line::

    posttrain prune --model DIR --method wanda --sparsity 0.5 --calibration task:arithmetic --out OUT

    >>> import torch
    >>> matrix_mask(torch.tensor([[4.0, 1.0], [3.0, 2.0]]), 0.5)
    tensor([[ True, False],
            [ True, False]])
    >>> n_of_m_mask(torch.tensor([[1.0, 4.0, 3.0, 2.0]]))
    tensor([[False,  True,  True, False]])
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from posttrain.errors import ConfigError, DataError, ModelError
from posttrain.toolbox import PRUNE_METHODS, STRUCTURED

# Model types whose decoder blocks are Llama's (self_attn.{q,k,v,o}_proj with heads independent up to o_proj,
# mlp.{gate,up,down}_proj): for these, slicing heads or channels and rewriting the config gives a valid model.
STRUCTURED_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


# --- masks (True = kept) --------------------------------------------------------------------------------------
def prune_count(sparsity: float, n: int) -> int:
    """How many of ``n`` weights (or units) a ``sparsity`` removes: floor(sparsity · n), robust to float error.

    >>> prune_count(0.3, 10), prune_count(0.57, 100), prune_count(0.5, 3)
    (3, 57, 1)
    """
    return min(n, math.floor(sparsity * n + 1e-6))


def matrix_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask of one weight matrix: its ``prune_count`` lowest scores (ties: the earlier entry) are pruned.

    >>> matrix_mask(torch.tensor([[1.0, 5.0], [2.0, 3.0]]), 0.25)
    tensor([[False,  True],
            [ True,  True]])
    """
    flat = scores.flatten()
    keep = torch.ones(flat.shape, dtype=torch.bool, device=scores.device)
    keep[torch.argsort(flat, stable=True)[: prune_count(sparsity, flat.numel())]] = False
    return keep.reshape(scores.shape)


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask pruning the ``prune_count(sparsity, in)`` lowest scores of every output row (Wanda's group).

    >>> row_mask(torch.tensor([[1.0, 5.0], [2.0, 3.0]]), 0.5)
    tensor([[False,  True],
            [False,  True]])
    """
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    lowest = torch.argsort(scores, dim=1, stable=True)[:, : prune_count(sparsity, scores.shape[1])]
    return keep.scatter(1, lowest, False)


def n_of_m_mask(scores: Tensor, *, n: int = 2, m: int = 4) -> Tensor:
    """Keep-mask keeping the ``n`` highest scores of every ``m`` consecutive inputs of a row (N:M sparsity).

    >>> n_of_m_mask(torch.tensor([[0.1, 0.2, 0.3, 0.4, 8.0, 1.0, 9.0, 2.0]]))
    tensor([[False, False,  True,  True,  True, False,  True, False]])
    """
    rows, cols = scores.shape
    if cols % m:
        raise ModelError(f"prune: {n}:{m} sparsity needs input sizes divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter(-1, groups.topk(n, dim=-1).indices, True).reshape(rows, cols)


def wanda_scores(weight: Tensor, input_sumsq: Tensor) -> Tensor:
    """|W_ij| · ||X_j||_2 (Wanda's score), from the (in,) sums of squares of the layer's inputs.

    >>> wanda_scores(torch.tensor([[-2.0, 1.0]]), torch.tensor([9.0, 16.0]))
    tensor([[6., 4.]])
    """
    return weight.detach().float().abs() * input_sumsq.float().sqrt()[None, :]


MASKS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "magnitude": matrix_mask,
    "wanda": row_mask,
    "2:4": lambda scores, sparsity: n_of_m_mask(scores),
}


def unstructured_mask(method: str, weight: Tensor, *, sparsity: float, input_sumsq: Tensor | None = None) -> Tensor:
    """The keep-mask ``method`` gives one (out, in) weight: Wanda scores when ``input_sumsq`` is given, else |W|.

    >>> unstructured_mask("wanda", torch.tensor([[3.0, 1.0]]), sparsity=0.5, input_sumsq=torch.tensor([0.0, 1.0]))
    tensor([[False,  True]])
    """
    scores = weight.detach().float().abs() if input_sumsq is None else wanda_scores(weight, input_sumsq)
    return MASKS[method](scores, sparsity)


# --- structured scores ----------------------------------------------------------------------------------------
def group_scores(o_weight: Tensor, v_weight: Tensor, *, kv_heads: int, o_input_sumsq: Tensor | None = None) -> Tensor:
    """(kv_heads,) scores of a layer's KV groups: ||o_proj columns of the group's query heads||_F times
    ||v_proj rows of its KV head||_F, or, given the o_proj input sums of squares, times the norm of those
    heads' attention output over the calibration tokens. Query head h reads KV head h // (heads / kv_heads).

    >>> group_scores(torch.tensor([[3.0, 0.0, 1.0, 1.0]]), torch.tensor([[2.0], [0.0]]), kv_heads=2)
    tensor([6., 0.])
    """
    hidden = o_weight.shape[0]
    o_norms = o_weight.detach().float().reshape(hidden, kv_heads, -1).pow(2).sum((0, 2)).sqrt()
    if o_input_sumsq is None:
        return o_norms * v_weight.detach().float().reshape(kv_heads, -1).pow(2).sum(1).sqrt()
    return o_norms * o_input_sumsq.float().reshape(kv_heads, -1).sum(1).sqrt()


def channel_scores(
    gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor, *, down_input_sumsq: Tensor | None = None
) -> Tensor:
    """(intermediate,) scores of a layer's MLP channels: ||down_proj[:, c]|| times ||gate[c]||·||up[c]||, or,
    given down_proj's input sums of squares, times the norm of channel c's activation over the calibration tokens.

    >>> channel_scores(torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [1.0]]), torch.tensor([[1.0, 4.0]]))
    tensor([3., 8.])
    """
    down_norms = down_weight.detach().float().pow(2).sum(0).sqrt()
    if down_input_sumsq is None:
        return down_norms * gate_weight.detach().float().norm(dim=1) * up_weight.detach().float().norm(dim=1)
    return down_norms * down_input_sumsq.float().sqrt()


def kept_units(scores: Tensor, sparsity: float) -> list[int]:
    """Indices (ascending) of the units kept: all but the ``prune_count`` lowest scores, at least one.

    >>> kept_units(torch.tensor([0.5, 3.0, 1.0, 2.0]), 0.5)
    [1, 3]
    """
    n = scores.numel()
    keep = max(1, n - prune_count(sparsity, n))
    return sorted(int(i) for i in torch.argsort(scores, descending=True, stable=True)[:keep])


# --- the model: layers, calibration --------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the decoder blocks at ``model.model.layers``."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ModelError(
            f"prune: {type(model).__name__} has no decoder blocks at model.model.layers; pruning supports"
            " Llama-style causal LMs (Llama, Mistral, Qwen, Phi-3, ...)"
        )
    return next(name for name, module in model.named_modules() if module is layers), layers


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The prunable layers: every ``nn.Linear`` inside the decoder blocks, by qualified name (embeddings and the
    output head are outside them)."""
    prefix, layers = decoder_layers(model)
    found = {
        f"{prefix}.{i}.{name}": module
        for i, layer in enumerate(layers)
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    }
    if not found:
        raise ModelError(f"prune: {type(model).__name__}'s decoder blocks hold no nn.Linear layers to prune")
    return found


def collect_input_sumsq(linears: dict[str, nn.Linear], run: Callable[[], Any]) -> dict[str, Tensor]:
    """Sum over every token that reaches each layer during ``run()`` of its squared inputs, per input feature:
    {name: (in,) float32}, through forward pre-hooks removed afterwards.

    >>> layer = nn.Linear(2, 1)
    >>> collect_input_sumsq({"l": layer}, lambda: layer(torch.tensor([[1.0, 2.0], [3.0, 0.0]])))["l"]
    tensor([10.,  4.])
    """
    sums = {name: torch.zeros(lin.in_features, device=lin.weight.device) for name, lin in linears.items()}

    def hook(name: str) -> Callable[..., None]:
        def accumulate(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().float()
            sums[name] += x.reshape(-1, x.shape[-1]).pow(2).sum(0)

        return accumulate

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return sums


def calibration_examples(spec: str, tokenizer: Any, *, rows: int, max_length: int) -> list[Any]:
    """The first ``rows`` rows of a data spec, tokenised whole (prompt and completion) and cut at ``max_length``."""
    from posttrain.data.prepare import prepare_examples
    from posttrain.data.rows import load_rows

    first = load_rows(spec)[:rows]
    try:
        prepared = prepare_examples(
            first, tokenizer, kind="sft", max_length=max_length, length_policy="truncate", completion_only=False
        )
    except DataError as err:
        raise DataError(spec, err.line, err.field, err.reason) from None
    return prepared.examples


def calibrate(model: nn.Module, linears: dict[str, nn.Linear], examples: list[Any]) -> dict[str, Tensor]:
    """``collect_input_sumsq`` over the model's forward of each calibration example, one sequence at a time."""
    device = next(model.parameters()).device
    model.eval()

    def run() -> None:
        for example in examples:
            model(input_ids=torch.tensor([example.input_ids], device=device), use_cache=False)

    return collect_input_sumsq(linears, run)


# --- pruning a model ------------------------------------------------------------------------------------------
def prune_unstructured(
    linears: dict[str, nn.Linear], method: str, sparsity: float, input_sumsq: dict[str, Tensor] | None
) -> dict[str, Tensor]:
    """Zero each layer's pruned weights in place; returns the keep-masks by layer name."""
    masks = {}
    with torch.no_grad():
        for name, linear in linears.items():
            if method == "2:4" and linear.in_features % 4:
                raise ModelError(f"prune: {name} has {linear.in_features} inputs, not a multiple of 4; 2:4 needs one")
            sumsq = input_sumsq[name] if input_sumsq is not None else None
            mask = unstructured_mask(method, linear.weight, sparsity=sparsity, input_sumsq=sumsq)
            linear.weight.mul_(mask.to(linear.weight.dtype))
            masks[name] = mask
    return masks


def _slice_linear(linear: nn.Linear, *, rows: list[int] | None = None, cols: list[int] | None = None) -> None:
    """Keep only the given output rows (and their biases) or input columns of ``linear``, in place."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows]
        linear.out_features = len(rows)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach()[rows].clone())
    if cols is not None:
        weight = weight[:, cols]
        linear.in_features = len(cols)
    linear.weight = nn.Parameter(weight.clone().contiguous())


def check_structured(model: nn.Module, structured: str) -> None:
    """Refuse structured pruning where slicing heads or channels is not known to give a valid model."""
    kind = getattr(model.config, "model_type", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj") if structured == "heads" else ("gate_proj", "up_proj", "down_proj")
    part = "self_attn" if structured == "heads" else "mlp"
    _, layers = decoder_layers(model)
    found = all(isinstance(getattr(getattr(layer, part, None), n, None), nn.Linear) for layer in layers for n in names)
    if kind not in STRUCTURED_TYPES or not found:
        raise ConfigError(
            f"prune.structured: removing {structured} is supported for model types"
            f" {', '.join(sorted(STRUCTURED_TYPES))} (separate {'/'.join(names)} layers); this model is {kind!r}."
            " Use unstructured pruning"
            " (--method magnitude|wanda|2:4 without --structured)"
        )


def prune_heads(model: nn.Module, sparsity: float, input_sumsq: dict[str, Tensor] | None) -> dict[str, list[int]]:
    """Remove the lowest-scoring KV groups of every layer (the same number in each); returns the query heads kept
    per layer, numbered as in the original model, and rewrites the config's head counts and ``head_dim``."""
    config = model.config
    prefix, layers = decoder_layers(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = layers[0].self_attn.q_proj.out_features // heads
    group = heads // kv_heads
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        shapes = (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features)
        if heads % kv_heads or shapes != (heads * head_dim, kv_heads * head_dim, heads * head_dim):
            raise ModelError(f"prune: {prefix}.{i}.self_attn's shapes {shapes} do not match {heads} heads x {head_dim}")
    kept = {}
    with torch.no_grad():
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            sumsq = input_sumsq[f"{prefix}.{i}.self_attn.o_proj"] if input_sumsq is not None else None
            scores = group_scores(attn.o_proj.weight, attn.v_proj.weight, kv_heads=kv_heads, o_input_sumsq=sumsq)
            groups = kept_units(scores, sparsity)
            query_heads = [g * group + j for g in groups for j in range(group)]
            # Head h owns rows h·head_dim ... (h+1)·head_dim - 1 of q (k, v: KV head g) and those columns of o.
            q_rows = [h * head_dim + d for h in query_heads for d in range(head_dim)]
            kv_rows = [g * head_dim + d for g in groups for d in range(head_dim)]
            _slice_linear(attn.q_proj, rows=q_rows)
            _slice_linear(attn.k_proj, rows=kv_rows)
            _slice_linear(attn.v_proj, rows=kv_rows)
            _slice_linear(attn.o_proj, cols=q_rows)
            kept[f"{prefix}.{i}"] = query_heads
    config.num_attention_heads = len(query_heads)
    config.num_key_value_heads = len(groups)
    config.head_dim = head_dim  # hidden_size / num_attention_heads no longer gives it
    return kept


def prune_channels(model: nn.Module, sparsity: float, input_sumsq: dict[str, Tensor] | None) -> dict[str, list[int]]:
    """Remove the lowest-scoring MLP intermediate channels of every layer (the same number in each); returns the
    channels kept per layer and rewrites the config's ``intermediate_size``."""
    prefix, layers = decoder_layers(model)
    kept = {}
    with torch.no_grad():
        for i, layer in enumerate(layers):
            mlp = layer.mlp
            sumsq = input_sumsq[f"{prefix}.{i}.mlp.down_proj"] if input_sumsq is not None else None
            scores = channel_scores(
                mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, down_input_sumsq=sumsq
            )
            channels = kept_units(scores, sparsity)
            _slice_linear(mlp.gate_proj, rows=channels)
            _slice_linear(mlp.up_proj, rows=channels)
            _slice_linear(mlp.down_proj, cols=channels)
            kept[f"{prefix}.{i}"] = channels
    model.config.intermediate_size = len(channels)
    return kept


# --- recovery -------------------------------------------------------------------------------------------------
def _masked_grad(mask: Tensor) -> Callable[[Tensor], Tensor]:
    """A gradient hook multiplying by ``mask`` (moved once to the gradient's device and dtype)."""
    moved: dict[tuple[Any, Any], Tensor] = {}

    def hook(grad: Tensor) -> Tensor:
        if (grad.device, grad.dtype) not in moved:
            moved.clear()
            moved[grad.device, grad.dtype] = mask.to(device=grad.device, dtype=grad.dtype)
        return grad * moved[grad.device, grad.dtype]

    return hook


def recover(
    model: nn.Module, tokenizer: Any, masks: dict[str, Tensor], *, out: Path, settings: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """Fine-tune ``model`` in place through the SFT scaffold (``settings``: SFTConfig keys, checked as
    ``prune.recover.KEY``) with each masked weight's gradient multiplied by its keep-mask. The run directory is
    temporary, beside ``out``. Returns the run's summary fields and its metrics.jsonl text."""
    from posttrain.config import SFTConfig, build_config
    from posttrain.train.scaffold import run_stage
    from posttrain.train.sft import LMStage

    out.parent.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.recover-", dir=out.parent))
    params = dict(model.named_parameters())
    handles = [params[f"{name}.weight"].register_hook(_masked_grad(mask)) for name, mask in masks.items()]
    try:
        cfg = build_config(SFTConfig, {**settings, "out": str(run_dir)}, path="prune.recover")
        summary = run_stage(LMStage(cfg, name="sft", model=model, tokenizer=tokenizer))
        metrics = (run_dir / "metrics.jsonl").read_text()
    finally:
        for handle in handles:
            handle.remove()
        shutil.rmtree(run_dir, ignore_errors=True)  # our own temporary run directory
    keys = ("steps", "skipped_steps", "final_train_loss", "heldout", "train_wall_s")
    return {"data": cfg.data, "lr": cfg.lr, **{k: summary.get(k) for k in keys}}, metrics


# --- the command ----------------------------------------------------------------------------------------------
def check_prune_args(
    method: str,
    sparsity: float | None,
    *,
    structured: str | None = None,
    calibration: str | None = None,
    calibration_rows: int = 32,
    max_length: int = 256,
    recover_steps: int = 0,
    recover_data: str | None = None,
) -> float:
    """Refuse arguments that cannot make a sensible pruning, naming the key; returns the sparsity to prune to
    (2:4: 0.5 when not given).

    >>> check_prune_args("2:4", None)
    0.5
    """
    if method not in PRUNE_METHODS:
        raise ConfigError(f"prune.method: unknown method {method!r}; choose one of {', '.join(PRUNE_METHODS)}")
    if method == "2:4" and sparsity not in (None, 0.5):
        raise ConfigError(f"prune.sparsity: 2:4 keeps 2 of every 4 weights, sparsity 0.5 by definition, not {sparsity}")
    sparsity = 0.5 if method == "2:4" else sparsity
    if sparsity is None:
        raise ConfigError("prune.sparsity: give the fraction of weights to remove, in [0, 1) (--sparsity S)")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"prune.sparsity: {sparsity} is outside [0, 1) (the fraction of weights removed)")
    if structured is not None and structured not in STRUCTURED:
        raise ConfigError(f"prune.structured: unknown {structured!r}; choose one of {', '.join(STRUCTURED)}")
    if structured is not None and method == "2:4":
        raise ConfigError(
            "prune.structured: 2:4 is a pattern inside each weight matrix; structured pruning scores heads or"
            " channels with --method magnitude (weight norms) or wanda (activation-aware, with calibration rows)"
        )
    if method == "wanda" and not calibration:
        raise ConfigError(
            "prune.calibration: wanda scores weights by their input activations and needs calibration rows"
            " (--calibration DATA: task:NAME or a .jsonl file)"
        )
    if method == "magnitude" and calibration:
        raise ConfigError(
            "prune.calibration: magnitude scores the weights alone; use --method wanda (or 2:4) to score with"
            " calibration rows, or drop --calibration"
        )
    for key, value in (("calibration_rows", calibration_rows), ("max_length", max_length)):
        if value < 1:
            raise ConfigError(f"prune.{key}: must be at least 1, got {value}")
    if recover_steps < 0:
        raise ConfigError(f"prune.recover_steps: must be >= 0 (0 = no recovery fine-tune), got {recover_steps}")
    if recover_data and not recover_steps:
        raise ConfigError("prune.recover_data: recovery rows without recover_steps; set recover_steps > 0")
    return sparsity


def zero_fractions(linears: dict[str, nn.Linear]) -> tuple[dict[str, float], float]:
    """({layer name: fraction of its weight entries that are exactly zero}, the fraction over all of them)."""
    zeros = {name: int((lin.weight == 0).sum()) for name, lin in linears.items()}
    sizes = {name: lin.weight.numel() for name, lin in linears.items()}
    return {name: zeros[name] / sizes[name] for name in zeros}, sum(zeros.values()) / sum(sizes.values())


def _prune(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    method: str,
    sparsity: float,
    *,
    structured: str | None,
    input_sumsq: dict[str, Tensor] | None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Prune in place: (keep-masks of the unstructured method, the structured record fields)."""
    if structured is None:
        return prune_unstructured(linears, method, sparsity, input_sumsq), {}
    before = {name: lin.weight.numel() for name, lin in linears.items()}
    kept = (prune_heads if structured == "heads" else prune_channels)(model, sparsity, input_sumsq)
    removed = {name: 1 - lin.weight.numel() / before[name] for name, lin in linears.items()}
    return {}, {"layer_removed": removed, "kept": kept}


def prune_model(
    model_spec: str,
    out: str | Path,
    *,
    method: str,
    sparsity: float | None = None,
    structured: str | None = None,
    calibration: str | None = None,
    calibration_rows: int = 32,
    max_length: int = 256,
    seed: int = 0,
    recover_steps: int = 0,
    recover_data: str | None = None,
    recover_lr: float = 1e-4,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Prune ``model_spec`` (model dir, adapter dir, ``builtin:NAME``) into a plain HF model in ``out`` (see the
    module docstring). ``sparsity`` is the fraction of each layer's weights (structured: of its heads or channels)
    removed; ``seed`` seeds the recovery run. Returns the record also saved as ``out/prune.json``.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> prune_model("builtin:tiny-base", f"{d}/p", method="magnitude", sparsity=0.5)["overall_sparsity"]
    0.5
    """
    from posttrain.models.loading import DTYPES, save_model_dir
    from posttrain.toolbox.merge import load_full

    checks = dict(structured=structured, calibration=calibration, calibration_rows=calibration_rows)
    checks.update(max_length=max_length, recover_steps=recover_steps, recover_data=recover_data)
    sparsity = check_prune_args(method, sparsity, **checks)
    if dtype not in DTYPES:
        raise ConfigError(f"prune.dtype: unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    model, tokenizer = load_full(model_spec)
    linears = decoder_linears(model)
    if structured is not None:
        check_structured(model, structured)
    examples = []
    if calibration:
        examples = calibration_examples(calibration, tokenizer, rows=calibration_rows, max_length=max_length)
    input_sumsq = calibrate(model, linears, examples) if examples else None
    parameters_before = sum(p.numel() for p in model.parameters())
    masks, structured_fields = _prune(model, linears, method, sparsity, structured=structured, input_sumsq=input_sumsq)
    recovery, extra = None, {}
    if recover_steps:
        settings = dict(model=model_spec, data=recover_data or "task:arithmetic", max_steps=recover_steps)
        settings.update(lr=recover_lr, max_length=max_length, seed=seed)
        recovery, extra["recover_metrics.jsonl"] = recover(model, tokenizer, masks, out=Path(out), settings=settings)
    model.eval()
    model.to(DTYPES[dtype])  # before measuring: the record describes the saved weights
    layer_sparsity, overall = zero_fractions(linears)
    record = {
        "model": model_spec,
        "method": method,
        "structured": structured,
        "sparsity": sparsity,
        "calibration": calibration,
        "calibration_rows": len(examples),
        "layer_sparsity": layer_sparsity,
        "overall_sparsity": overall,
        "parameters_before": parameters_before,
        "parameters_after": sum(p.numel() for p in model.parameters()),
        **structured_fields,
        "recovery": recovery,
        "dtype": dtype,
        "seed": seed,
    }
    extra["prune.json"] = json.dumps(record, indent=1) + "\n"
    save_model_dir(model, tokenizer, Path(out), extra_files=extra)
    return record
