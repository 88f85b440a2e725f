"""Loading and saving Hugging Face causal LMs, tokenizers and PEFT adapters.

``model`` may be a local HF model directory, a PEFT adapter directory (its base is loaded from the adapter's
``base_model_name_or_path``), ``builtin:tiny-base`` (the shipped, pretrained embedded default),
``builtin:smollm2-135m-instruct`` (a real 135 M-parameter chat model, converted once into the cache from the
``smollm2`` extra's package: ``posttrain.models.smollm2``), or a hub id, which is handed to ``transformers`` and
fails offline with a clear message.

    >>> model, tok = load_model("builtin:tiny-base")
    >>> type(model).__name__, tok.eos_token
    ('LlamaForCausalLM', '</s>')
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ModelError

ASSETS = Path(__file__).resolve().parent.parent / "assets"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def builtin_path(name: str) -> Path:
    """Directory of a shipped model (``builtin:tiny-base``) or of a converted one (``builtin:smollm2-135m-instruct``,
    converted into the cache on first use)."""
    from posttrain.models import derived, smollm2

    if name == smollm2.NAME:
        return smollm2.ensure_smollm2()
    if name == derived.TINY_HALF:
        return derived.ensure_tiny_half()
    path = ASSETS / name
    if not (path / "config.json").is_file():
        raise ModelError(f"builtin:{name}: no such shipped model (shipped: {', '.join(shipped_models())})")
    return path


def shipped_models() -> list[str]:
    """Names ``builtin:NAME`` loads: the models in the package's assets and those converted from an extra."""
    from posttrain.models import derived, smollm2

    shipped = [p.name for p in ASSETS.iterdir() if (p / "config.json").is_file()] if ASSETS.is_dir() else []
    return sorted([*shipped, smollm2.NAME, derived.TINY_HALF])


def resolve(spec: str) -> str:
    """A local path for builtin/local specs; a hub id is returned unchanged."""
    if spec.startswith("builtin:"):
        return str(builtin_path(spec.removeprefix("builtin:")))
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{spec}: a model must be a directory (with config.json), not a file")
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelError(f"{spec}: not a model directory (no config.json or adapter_config.json)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"{spec}: no such model directory")
    return spec


def is_adapter(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file()


def _from_pretrained(loader: Any, path: str, **kw: Any) -> Any:
    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        # huggingface_hub reads HF_HUB_OFFLINE once, at import; honour it as set now, with no network retries.
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise ModelError(
                f"{path}: not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE=1."
                " Download it where the hub is reachable and pass the local directory instead."
            )
        kw["local_files_only"] = True
    try:
        return loader.from_pretrained(path, **kw)
    except OSError as err:
        if Path(path).exists():
            raise ModelError(f"{path}: cannot load ({err})") from None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelError(
            f"{path}: not a local directory, and loading it from the Hugging Face hub failed"
            f"{' (HF_HUB_OFFLINE=1)' if offline else ' (no network?)'}. Download it where the hub is reachable"
            " and pass the local directory instead."
        ) from None
    except ValueError as err:
        raise ModelError(f"{path}: {err}") from None


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model or adapter directory; a missing pad token falls back to EOS."""
    from transformers import AutoTokenizer

    path = resolve(spec)
    tokenizer = _from_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def adapter_type(path: str | Path) -> str | None:
    """The peft type (``LORA``, ``PROMPT_TUNING``, ...) of an adapter directory, or None for anything else.

    >>> adapter_type(resolve("builtin:tiny-base")) is None
    True
    """
    config = Path(path) / "adapter_config.json"
    if not is_adapter(str(path)):
        return None
    try:
        return str(json.loads(config.read_text()).get("peft_type", ""))
    except (OSError, ValueError) as err:
        raise ModelError(f"{config}: unreadable adapter config ({err})") from None


def load_model(
    spec: str, *, dtype: str = "float32", trust_remote_code: bool = False, trainable: bool = False
) -> tuple[Any, Any]:
    """(model, tokenizer) for a model dir, adapter dir, builtin or hub id (see module docstring); ``trainable``
    loads an adapter with its weights trainable (to go on training it). A builtin model records its
    ``builtin:NAME`` as its name, so adapters trained on it name the builtin, not a cache path."""
    from transformers import AutoModelForCausalLM

    path = resolve(spec)
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if is_adapter(path):
        from peft import PeftModel

        base_spec = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
        base, _ = load_model(base_spec, dtype=dtype, trust_remote_code=trust_remote_code)
        prompt = adapter_type(path) in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
        model = PeftModel.from_pretrained(base, path, is_trainable=trainable and not prompt)
        if trainable and prompt:  # peft refuses is_trainable here; its virtual tokens are the whole adapter
            model.active_peft_config.inference_mode = False
            model.prompt_encoder.requires_grad_(True)
        tokenizer_dir = path if (Path(path) / "tokenizer_config.json").is_file() else resolve(base_spec)
        return model, load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    from posttrain.models.quant import require_loader

    require_loader(path)  # a quantized model (posttrain quantize) needs its library
    model = _from_pretrained(AutoModelForCausalLM, path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    if spec.startswith("builtin:"):
        model.name_or_path = spec  # what peft records as an adapter's base
    return model, load_tokenizer(path, trust_remote_code=trust_remote_code)


def save_model_dir(
    model: Any, tokenizer: Any, out: Path, *, state_dict: dict | None = None, extra_files: dict[str, str] | None = None
) -> None:
    """Save an HF model (or PEFT adapter) with its tokenizer to ``out`` atomically (a fresh temp dir, then a
    rename); the files are listed in ``.posttrain-files.json``, and an existing ``out`` is replaced only when
    posttrain wrote all of it (``posttrain.rundir.replace_dir``). ``state_dict`` (full tensors by parameter name)
    replaces the model's own, e.g. weights gathered from shards; ``extra_files`` ({name: text}) are written beside
    them (a merge's recipe, a quantisation record)."""
    from posttrain.rundir import replace_dir, temp_dir_for

    out = Path(out)
    tmp = temp_dir_for(out)
    try:
        kwargs = {"state_dict": state_dict} if state_dict is not None else {}
        model.save_pretrained(tmp, safe_serialization=True, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)  # our own temp dir, left only when saving failed


def parameter_count(model: Any) -> int:
    """Parameters of ``model`` as a full-precision model has them: a 4-bit layer stores two weights per element."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "num_parameters"):
        return int(base.num_parameters())
    return sum(p.numel() for p in model.parameters())


def weights_on_disk(model_spec: str) -> int:
    """Bytes of weight files (safetensors, bin) of a model directory; an adapter counts its base too."""
    path = Path(resolve(model_spec))
    if not path.is_dir():
        return 0
    total = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))
    if is_adapter(str(path)):
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path", "")
        total += weights_on_disk(base) if base else 0
    return total
