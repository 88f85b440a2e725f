"""posttrain: LLM post-training in one tool.

The Python API mirrors the CLI: one typed config per stage, one function per stage. Names are imported on first
use, so ``import posttrain.rewards`` (say) loads neither the training code nor torch-heavy stages.

    >>> import tempfile
    >>> from posttrain import SFTConfig, build_config, run_sft
    >>> cfg = build_config(SFTConfig, {"model": "builtin:tiny-base", "data": "task:arithmetic",
    ...                                "out": tempfile.mkdtemp(), "max_steps": 2, "batch_size": 2,
    ...                                "progress": False}, path="sft")
    >>> run_sft(cfg)["steps"]
    2
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

# transformers imports torchao (the ``quantize`` extra) whenever it is installed, as soon as it is imported itself;
# torchao's import-time warnings (its CUDA extensions, absent from a CPU build of torch, and a torch deprecation
# notice about its enums) say nothing to a posttrain user.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
# bitsandbytes (the qlora and quantize extras) looks for a faster CPU 4-bit kernel on the Hugging Face hub (the
# ``kernels`` package) at import and warns when it cannot; its own kernel is used then, which is what we measure.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_EXPORTS = {
    "ConfigError": "posttrain.errors",
    "DataError": "posttrain.errors",
    "ModelError": "posttrain.errors",
    "PosttrainError": "posttrain.errors",
    "TrainingError": "posttrain.errors",
    "DPOConfig": "posttrain.config",
    "EvalConfig": "posttrain.config",
    "GRPOConfig": "posttrain.config",
    "PPOConfig": "posttrain.config",
    "PretrainConfig": "posttrain.config",
    "RMConfig": "posttrain.config",
    "SFTConfig": "posttrain.config",
    "build_config": "posttrain.config",
    "STAGES": "posttrain.stages",
    "evaluate": "posttrain.eval.harness",
    "evaluate_model": "posttrain.eval.harness",
    "load_model": "posttrain.models.loading",
    "add_lora": "posttrain.models.lora",
    "merge_adapter": "posttrain.models.lora",
    "load_recipe": "posttrain.pipeline",
    "run_demo": "posttrain.pipeline",
    "run_recipe": "posttrain.pipeline",
    "get_task": "posttrain.tasks",
    "run_pretrain": "posttrain.train.sft",
    "run_sft": "posttrain.train.sft",
    "run_dpo": "posttrain.train.dpo",
    "run_rm": "posttrain.train.rm",
    "run_grpo": "posttrain.train.grpo",
    "run_ppo": "posttrain.train.ppo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'posttrain' has no attribute {name!r}")
