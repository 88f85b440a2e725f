"""posttrain: LLM post-training in one tool.

The Python API mirrors the CLI: one typed config per stage, one function per stage.

    >>> import tempfile
    >>> from posttrain import SFTConfig, build_config, run_sft
    >>> cfg = build_config(SFTConfig, {"model": "builtin:tiny-base", "data": "task:arithmetic",
    ...                                "out": tempfile.mkdtemp(), "max_steps": 2, "batch_size": 2,
    ...                                "progress": False}, path="sft")
    >>> run_sft(cfg)["steps"]
    2
"""

from posttrain.config import EvalConfig, PretrainConfig, SFTConfig, build_config
from posttrain.errors import ConfigError, DataError, ModelError, PosttrainError, TrainingError
from posttrain.eval.harness import evaluate, evaluate_model
from posttrain.models.loading import load_model
from posttrain.models.lora import add_lora, merge_adapter
from posttrain.pipeline import load_recipe, run_demo, run_recipe
from posttrain.tasks import get_task
from posttrain.train.sft import run_pretrain, run_sft

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "EvalConfig",
    "ModelError",
    "PosttrainError",
    "PretrainConfig",
    "SFTConfig",
    "TrainingError",
    "add_lora",
    "build_config",
    "evaluate",
    "evaluate_model",
    "get_task",
    "load_model",
    "load_recipe",
    "merge_adapter",
    "run_demo",
    "run_pretrain",
    "run_recipe",
    "run_sft",
]
