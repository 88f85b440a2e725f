"""LoRA through ``peft``: attach adapters, and merge an adapter into its base.

Target modules default to peft's ``"all-linear"``: every linear (or GPT-2 ``Conv1D``) layer except the output
head, which covers Llama, Qwen2 and GPT-2 alike; a list of module names overrides it.

    >>> from posttrain.models.tiny import build_tokenizer, build_model
    >>> model = add_lora(build_model(build_tokenizer()), rank=4)
    >>> sorted({n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad})
    ['lora_A', 'lora_B']
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def add_lora(model: Any, *, rank: int, alpha: float = 16.0, dropout: float = 0.0, targets: Sequence[str] = ()) -> Any:
    """Wrap ``model`` in a ``peft`` LoRA model; only adapter weights stay trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets) if targets else "all-linear",
        task_type=TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, config)


def merge_adapter(base: str, adapter: str, out: str | Path, *, dtype: str = "float32") -> Path:
    """Write ``base`` + ``adapter`` as one plain HF model directory (loadable without peft or posttrain)."""
    from peft import PeftModel

    from posttrain.models.loading import load_model, save_model_dir

    model, tokenizer = load_model(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    save_model_dir(merged, tokenizer, Path(out))
    return Path(out)
