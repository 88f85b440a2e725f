"""4-bit base models for QLoRA (Dettmers et al. 2023): NF4 weights through bitsandbytes, the ``qlora`` extra.

:func:`load_4bit` loads a causal LM with every linear layer of its blocks stored as NF4 codes (bitsandbytes
``Linear4bit``: two 4-bit codes per uint8, one float32 absmax per block of 64 weights) and everything else
(embeddings, the tied or untied output head, norms) in ``dtype``; all weights are frozen. ``add_lora``
(``lora.py``) then trains adapters on it; each 4-bit layer dequantises its weight for every matmul, in the
forward and in the backward, where gradients flow through it to the adapters below. The adapter saves with
``save_pretrained`` like any other.

Measured with bitsandbytes 0.50.2, torch 2.13.0+cpu, transformers 5.23.0, peft 0.21.2 on SmolLM2-135M-Instruct
(the cache's fp32 directory), one batch of 4 x 128 tokens of English text, LoRA r=8 on all linear layers,
AdamW; 2 threads of a 2-core AMD EPYC (AVX512-BF16) that other work shared, so the timings are indicative
(medians of 3 steps after a warm-up, from the two quietest runs):

    =======================================  ==========  ===============  ================
    measure                                  fp32 base   4-bit, float32   4-bit, bfloat16
    =======================================  ==========  ===============  ================
    weights: parameters, buffers, absmax     513 MiB     165 MiB          111 MiB
    loss of the batch, before training       5.143       5.404            5.417
    s/step: forward, backward, AdamW         2.7-2.9     2.9-3.2          2.4
    =======================================  ==========  ===============  ================

Of the 165 MiB, the 106 M linear weights take 57 MiB (4 bits each plus a float32 absmax per 64); the rest is
the unquantised tied embedding (108 MiB in float32). The fp32 base is itself dequantised from a Q4_1 GGUF
(``smollm2.py``), so NF4 quantises it a second time. Loading and quantising takes about 2-3 s.

An adapter trained on the 4-bit base reloads with plain ``peft`` onto a fresh 4-bit base with equal logits.
Onto the fp32 base it also loads and merges (merged == unmerged), and it lowers the loss there as it does on
the 4-bit base, but the logits are those of another base (the base's quantisation error, not the adapter's),
so they are not allclose to the 4-bit ones. Merging into the 4-bit base requantises the sum and moves the logits
by as much as quantising did: merge into the full-precision base (``lora.merge_adapter``).

On a CPU with AVX512-BF16, bitsandbytes 0.49 and 0.50 repack a ``Linear4bit`` into an inference-only layout the
first time it runs in eval mode without gradients (an evaluation pass, a generation). The layer then computes
through an op with no backward: a later training step gets no gradient through the base (only the adapters
next to the residual stream learn), with nothing but a ``UserWarning`` from autograd. :func:`load_4bit` turns
the repacking off on every layer (``support_avx512bf16_for_cpu = False``); eval passes take the generic
dequantising path (about 20% slower for one 4 x 128 eval pass here; generation speed not measured).

Tried and not chosen: torchao 0.18 (needs torch >= 2.11; its CUDA extensions fail to load on the CPU build, as
expected). Its int4 weight-only layouts through transformers' ``TorchAoConfig`` do not run on CPU ("Requires
mslk >= 1.0.0", "Int4PlainInt32Tensor does not support device 'cpu' yet", "Torch not compiled with CUDA
enabled"), and peft's torchao LoRA accepts int8 weights only. Its ``to_nf4`` weights, swapped into the linear
layers by hand (transformers has no NF4 config for torchao), do train under peft's LoRA with gradients in every
layer and the same loss (5.402), but need ``scaler_block_size=64`` for SmolLM2's shapes (the default 256 raises
"Number of scalers must be divisible by scaler block size"), take 6-9 s to quantise and 3.8 s/step.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

from posttrain.errors import ModelError

QLORA_INSTALL = "pip install 'posttrain[qlora]'"
# Transformers' own minimums; tests/test_qlora.py passes with bitsandbytes 0.46.1, 0.47.0, 0.48.2, 0.49.2, 0.50.2.
REQUIRED = {"bitsandbytes": "0.46.1", "accelerate": "1.1"}
QUANTIZE_INSTALL = "pip install 'posttrain[quantize]'"
# config.json's quantization_config.quant_method -> the packages that load it (``posttrain quantize`` writes
# torchao int8 and bitsandbytes int4; tested with torchao 0.18.0, the first release for torch >= 2.11)
LOADERS = {"torchao": {"torchao": "0.18"}, "bitsandbytes": REQUIRED}


def load_4bit(spec: str, *, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False) -> Any:
    """The causal LM of ``spec`` (a model directory, ``builtin:NAME`` or a hub id, as for ``load_model``) with its
    linear layers quantised to 4-bit NF4 and every weight frozen, ready for ``add_lora``.

    ``dtype`` ("float32", "bfloat16" or "float16") is the compute dtype of the 4-bit layers and the dtype of the
    weights left unquantised. The weights are quantised and placed on ``device`` ("cpu", or "cuda" (untested here):
    without it transformers would pick the current GPU whenever one is visible). The tokenizer is
    ``load_tokenizer(spec)``. Raises ``ModelError`` when the ``qlora`` extra (bitsandbytes and accelerate) is
    missing or too old, and for an adapter directory (quantise its base, then ``PeftModel.from_pretrained``)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from posttrain.models.loading import DTYPES, _from_pretrained, is_adapter, resolve

    bnb = _import_qlora_extra()
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    path = resolve(spec)
    if is_adapter(path):
        raise ModelError(f"{spec}: an adapter directory; 4-bit loading quantises a base model: pass its base")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[dtype]
    )
    model = _from_pretrained(
        AutoModelForCausalLM,
        path,
        dtype=DTYPES[dtype],
        quantization_config=quantization,
        device_map={"": device},
        trust_remote_code=trust_remote_code,
    )
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # No inference-only repacking on AVX512-BF16 CPUs: it silently cuts gradients (module docstring).
            module.support_avx512bf16_for_cpu = False
    model.requires_grad_(False)
    return model


def _import_qlora_extra() -> Any:
    """bitsandbytes, once it and accelerate (which transformers needs to load any bitsandbytes model) are found."""
    require_packages(REQUIRED, what="4-bit loading (QLoRA)", install=QLORA_INSTALL)
    import bitsandbytes

    return bitsandbytes


def require_packages(packages: dict[str, str], *, what: str, install: str) -> None:
    """Each of ``packages`` ({name: minimum version}) installed and recent enough, or a ``ModelError`` saying that
    ``what`` needs it and how to ``install`` it."""
    from packaging.version import Version

    for package, minimum in packages.items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            raise ModelError(f"{what} needs {package}: {install}") from None
        if Version(installed) < Version(minimum):
            raise ModelError(f"{what} needs {package} >= {minimum} (found {installed}): {install}")


def quantization_of(path: str | Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of a model directory's ``config.json`` (``posttrain quantize`` writes one), or
    None (not quantized, not a local model directory).

    >>> from posttrain.models.loading import resolve
    >>> quantization_of(resolve("builtin:tiny-base")) is None
    True
    """
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None  # the loader reports an unreadable config


def require_loader(path: str | Path) -> None:
    """Before loading a quantized model directory: the packages its quantization needs, or a ``ModelError``."""
    config = quantization_of(path)
    method = (config or {}).get("quant_method", "")
    if method in LOADERS:
        require_packages(
            LOADERS[method], what=f"{path}: a model quantized with {method}; loading it", install=QUANTIZE_INSTALL
        )
