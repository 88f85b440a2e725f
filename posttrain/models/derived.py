"""Built-in models derived from a shipped one on first use and kept in the cache.

``builtin:tiny-half`` is the shipped tiny base (``builtin:tiny-base``, 4 decoder layers) with every other decoder
layer kept, layers 0 and 2: the same tokenizer, width and embeddings, half the depth (538,112 parameters of
tiny-base's 1,062,912). Of the pairs tried, it keeps the most of the base as a language model: perplexity on
``corpus:val`` 4.39 (the base 1.52; layers 0+1 5.13, 0+3 10.26, 1+3 13,931, 2+3 17,691).
It is the smaller student of the distillation recipe: initialising a student from a subset of the teacher
family's layers is DistilBERT's recipe (Sanh et al. 2019), and a student that shares the teacher's tokenizer is
what token-level distillation needs. It is a plain HF directory, written into a temporary directory and renamed
under a lock (as the SmolLM2 conversion is).

    >>> from transformers import AutoConfig
    >>> AutoConfig.from_pretrained(ensure_tiny_half()).num_hidden_layers
    2
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from pathlib import Path

TINY_HALF = "tiny-half"
HALF_LAYERS = (0, 2)  # of tiny-base's 4
VERSION = 1


def tiny_half_dir() -> Path:
    from posttrain.cache import cache_dir

    return cache_dir() / "models" / f"{TINY_HALF}-v{VERSION}"


def ensure_tiny_half() -> Path:
    """The directory of ``builtin:tiny-half``, derived from the shipped tiny base when the cache has none."""
    out = tiny_half_dir()
    if (out / "PROVENANCE.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the directory complete
        if not (out / "PROVENANCE.json").is_file():
            _derive_into(out)
    return out


def keep_layers(model: object, keep: tuple[int, ...]) -> None:
    """Keep only the decoder layers ``keep`` (in order) of a Llama-style causal LM, renumbering their cache slots
    and the config (``num_hidden_layers``, per-layer ``layer_types`` where the config has them)."""
    import torch

    layers = model.model.layers  # type: ignore[attr-defined]
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])  # type: ignore[attr-defined]
    for index, layer in enumerate(model.model.layers):  # type: ignore[attr-defined]
        layer.self_attn.layer_idx = index
    config = model.config  # type: ignore[attr-defined]
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)


def _derive_into(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models.loading import ASSETS

    source = ASSETS / "tiny-base"
    model = AutoModelForCausalLM.from_pretrained(source)
    keep_layers(model, HALF_LAYERS)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        provenance = {"derived_from": "builtin:tiny-base", "kept_layers": list(HALF_LAYERS), "version": VERSION}
        (tmp / "PROVENANCE.json").write_text(json.dumps(provenance, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)  # an incomplete directory from an interrupted derivation (no PROVENANCE.json)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
