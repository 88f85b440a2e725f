"""The model toolbox: what users do to a trained model before serving it: merge, prune
and quantize.

Each tool reads models the way every command does (a model dir, an adapter dir, ``builtin:NAME``) and writes a
plain Hugging Face model directory. Distillation is a training stage (``posttrain.train``), not a tool here.
"""

MERGE_METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")
PRUNE_METHODS = ("magnitude", "wanda", "2:4")
STRUCTURED = ("heads", "mlp")
QUANT_METHODS = ("int8", "int4")
INT4_TYPES = ("nf4", "fp4")
