"""Pure loss functions on tensors. Legend: B batch rows, T tokens, V vocabulary.

Each loss returns *unreduced* values; reduction is one named function in ``reduce.py``.
"""

from posttrain.losses.chunked import chunked_token_logps
from posttrain.losses.logprobs import token_logps
from posttrain.losses.reduce import masked_sum, row_mean, sequence_mean, token_mean
from posttrain.losses.sft import sft_loss

__all__ = [
    "chunked_token_logps",
    "masked_sum",
    "row_mean",
    "sequence_mean",
    "sft_loss",
    "token_logps",
    "token_mean",
]
