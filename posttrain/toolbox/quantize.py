"""Weight-only quantization: int8 through torchao, int4 (NF4 or FP4) through bitsandbytes, saved as a Hugging
Face model directory that ``load_model`` (so ``eval``, ``generate``, every stage that reads a model) and plain
``AutoModelForCausalLM.from_pretrained`` reload, the quantization recorded in its ``config.json``.

What is quantized: every ``nn.Linear`` except the output head (transformers keeps the tied or untied head and
the embeddings in full precision, as both libraries' integrations do); norms and embeddings stay in ``dtype``.

- ``int8``: torchao's ``Int8WeightOnlyConfig`` through transformers' ``TorchAoConfig``: one int8 code per weight
  and one float scale per output row, symmetric: ``s = max_j |W_ij| / 127.5``, ``q = clamp(round(W / s), -128,
  127)`` (``tests/test_quantize.py`` checks the codes against this by hand). Activations stay in ``dtype``; the
  matmul runs on the dequantized weight (or torch's int8 weight-only kernel).
- ``int4``: bitsandbytes' ``Linear4bit`` through ``BitsAndBytesConfig``: blocks of 64 weights, each scaled by its
  absolute maximum and rounded to the nearest of 16 levels (``nf4``: the NormalFloat levels of Dettmers et al.
  2023; ``fp4``: a 4-bit float), two codes per byte, one float32 absmax per block (``double_quant`` quantizes the
  absmax values too, saving about 0.4 bits per weight).

Why two libraries, measured with torch 2.13.0+cpu, transformers 5.23.0, torchao 0.18.0, bitsandbytes 0.50.2 on a
CPU: torchao's int8 weight-only tensors save to safetensors and reload (bitsandbytes' int8 is LLM.int8(): it
also quantizes the activations, through float16, and moved the tiny model's logits 2.6x as far); torchao's int4
either does not run on a CPU (``Int4WeightOnlyConfig``'s layouts need CUDA or the mslk kernels) or stores each
4-bit code in a byte (``IntxWeightOnlyConfig(weight_dtype=torch.int4)``: larger on disk than int8), while
bitsandbytes packs NF4 two codes per byte, saves, reloads and runs on a CPU (it is already the ``qlora`` extra).

Adapters are folded into their base first; an already quantized model is refused (quantize the original). The
record (method, library and version, layers quantized, bytes on disk before and after) is returned and written as
``quantize.json`` beside the weights. From the command line::

    posttrain quantize --model DIR --method int8 --out OUT

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> record = quantize_model("builtin:tiny-base", f"{d}/q8", method="int8")
    >>> record["library"], record["layers_quantized"], record["bytes_after"] < record["bytes_before"] / 3
    ('torchao', 28, True)
"""

from __future__ import annotations

import json
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError, ModelError
from posttrain.models.quant import LOADERS, QUANTIZE_INSTALL, quantization_of, require_packages
from posttrain.toolbox import INT4_TYPES, QUANT_METHODS

REQUIRED = {"int8": LOADERS["torchao"], "int4": LOADERS["bitsandbytes"]}
LIBRARY = {"int8": "torchao", "int4": "bitsandbytes"}


def quantize_model(
    model_spec: str,
    out: str | Path,
    *,
    method: str,
    int4_type: str = "nf4",
    double_quant: bool = False,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Quantize ``model_spec`` (model dir, adapter dir, ``builtin:NAME``) to ``method`` ("int8" or "int4") into
    ``out`` (see the module docstring). ``dtype`` is that of the weights left unquantized and of the activations.
    Returns the record also saved as ``out/quantize.json``."""
    from posttrain.models.loading import DTYPES, adapter_type, load_tokenizer, resolve, weights_on_disk
    from posttrain.rundir import replace_dir

    check_quantize_args(method, int4_type=int4_type, double_quant=double_quant)
    if dtype not in DTYPES:
        raise ConfigError(f"quantize.dtype: unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    require(method)
    path = resolve(model_spec)
    existing = quantization_of(path)
    if existing is not None:
        raise ModelError(
            f"{model_spec}: already quantized ({existing.get('quant_method', '?')}); quantize the full-precision"
            " model it was made from"
        )
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=_existing_parent(Path(out))) as tmp:
        source, staged = path, Path(tmp) / "out"
        if adapter_type(path) is not None:  # fold the adapter into its base, then quantize that
            from posttrain.toolbox.merge import load_full

            folded, tokenizer = load_full(model_spec)
            source = str(Path(tmp) / "folded")
            folded.save_pretrained(source, safe_serialization=True)
            tokenizer.save_pretrained(source)
            del folded
        model = _load_quantized(source, method, int4_type=int4_type, double_quant=double_quant, dtype=DTYPES[dtype])
        tokenizer = load_tokenizer(source)
        model.save_pretrained(staged, safe_serialization=True)  # before any forward: bitsandbytes may repack then
        tokenizer.save_pretrained(staged)
        record = {
            "model": model_spec,
            "method": method,
            "library": LIBRARY[method],
            "library_version": metadata.version(LIBRARY[method]),
            "format": _format(method, int4_type, double_quant),
            "layers_quantized": len(quantized_layers(model)),
            "kept_full_precision": sorted(
                name for name, module in model.named_modules() if _is_linear(module) and not _is_quantized(module)
            ),
            "parameters": model.num_parameters(),
            "bytes_before": weights_on_disk(model_spec),
            "bytes_after": weights_on_disk(str(staged)),
            "dtype": dtype,
        }
        (staged / "quantize.json").write_text(json.dumps(record, indent=1) + "\n")
        replace_dir(staged, Path(out))
    return record


def check_quantize_args(method: str, *, int4_type: str = "nf4", double_quant: bool = False) -> None:
    """Refuse an unknown method or int4 option, naming the key (before anything is loaded).

    >>> check_quantize_args("int3")
    Traceback (most recent call last):
    posttrain.errors.ConfigError: quantize.method: unknown method 'int3'; choose one of int8, int4
    """
    if method not in QUANT_METHODS:
        raise ConfigError(f"quantize.method: unknown method {method!r}; choose one of {', '.join(QUANT_METHODS)}")
    if int4_type not in INT4_TYPES:
        raise ConfigError(f"quantize.int4_type: unknown {int4_type!r}; choose one of {', '.join(INT4_TYPES)}")
    if method != "int4" and (int4_type != "nf4" or double_quant):
        raise ConfigError("quantize.int4_type/double_quant: options of --method int4 only")


def require(method: str) -> None:
    """Check that the packages ``method`` needs are installed and recent enough; a ``ModelError`` says how to
    install them."""
    require_packages(REQUIRED[method], what=f"{method} quantization", install=QUANTIZE_INSTALL)


def quantized_layers(model: Any) -> list[str]:
    """Names of the linear layers of ``model`` whose weights are stored quantized."""
    return [name for name, module in model.named_modules() if _is_quantized(module)]


def _is_linear(module: Any) -> bool:
    from torch import nn

    return isinstance(module, nn.Linear)


def _is_quantized(module: Any) -> bool:
    weight = getattr(module, "weight", None)
    return _is_linear(module) and weight is not None and type(weight).__name__ in ("Int8Tensor", "Params4bit")


def _load_quantized(source: str, method: str, *, int4_type: str, double_quant: bool, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TorchAoConfig

    from posttrain.models.loading import _from_pretrained

    if method == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        config = TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=int4_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    return _from_pretrained(
        AutoModelForCausalLM, source, dtype=dtype, quantization_config=config, device_map={"": "cpu"}
    )


def _format(method: str, int4_type: str, double_quant: bool) -> str:
    if method == "int8":
        return "int8 per output row, symmetric (Int8WeightOnlyConfig)"
    return f"{int4_type} in blocks of 64, float32 absmax per block{', double-quantized' if double_quant else ''}"


def _existing_parent(out: Path) -> Path:
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent
