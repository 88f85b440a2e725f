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
    return add_adapters(model, "lora", rank=rank, alpha=alpha, dropout=dropout, targets=targets)


def add_adapters(
    model: Any,
    method: str,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] = (),
    virtual_tokens: int = 16,
) -> Any:
    """Wrap ``model`` in a ``peft`` model of ``method``: ``lora``, ``dora`` (LoRA with a learned magnitude per
    output, Liu et al. 2024), ``rslora`` (LoRA scaled by alpha/sqrt(r), Kalajdzievski 2023), ``ia3`` (learned
    rescaling of keys, values and the MLP's inner activations, Liu et al. 2022), ``prompt`` (``virtual_tokens``
    learned input embeddings in front of each sequence, initialised from sampled vocabulary embeddings; Lester et
    al. 2021) or ``prefix`` (learned keys and values in every layer; Li & Liang 2021). Only adapter weights
    train. Prompt learning runs on packed rows through ``posttrain.models.virtual``.

    >>> from posttrain.models.tiny import build_model, build_tokenizer
    >>> ia3 = add_adapters(build_model(build_tokenizer()), "ia3")
    >>> sorted({n.split(".")[-2] for n, p in ia3.named_parameters() if p.requires_grad})
    ['ia3_l']
    """
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    if method in ("lora", "dora", "rslora"):
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(targets) if targets else "all-linear",
            use_dora=method == "dora",
            use_rslora=method == "rslora",
            task_type=TaskType.CAUSAL_LM,
        )
    elif method == "ia3":
        kwargs: dict[str, Any] = {}
        if targets:  # feed-forward modules scale their input, the others their output (peft's convention)
            kwargs = {"target_modules": list(targets), "feedforward_modules": [t for t in targets if t in FEEDFORWARD]}
        config = IA3Config(task_type=TaskType.CAUSAL_LM, **kwargs)
    elif method == "prompt":
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual_tokens, prompt_tuning_init="SAMPLE_VOCAB"
        )
    elif method == "prefix":
        config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual_tokens)
    else:
        raise ValueError(f"unknown peft method {method!r}")
    return get_peft_model(model, config)


# Module names that are the input side of an MLP's down projection in common architectures (for ia3 targets).
FEEDFORWARD = ("down_proj", "fc2", "c_proj", "mlp.c_proj", "w2", "dense_4h_to_h")


def merge_adapter(base: str, adapter: str, out: str | Path, *, dtype: str = "float32") -> Path:
    """Write ``base`` + ``adapter`` as one plain HF model directory (loadable without peft or posttrain)."""
    from peft import PeftModel

    from posttrain.errors import ModelError
    from posttrain.models.loading import adapter_type, load_model, save_model_dir

    kind = adapter_type(adapter)
    if kind in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        raise ModelError(
            f"{adapter}: a {kind.lower()} adapter adds virtual tokens, it has no weights to fold into the base;"
            " use it as it is (posttrain eval/generate --model ADAPTER_DIR, or peft's PeftModel.from_pretrained)"
        )
    model, tokenizer = load_model(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    save_model_dir(merged, tokenizer, Path(out))
    return Path(out)
