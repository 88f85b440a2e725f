"""Inference-time search strategies with verifiers and compute accounting (see ``strategies``)."""

from posttrain.search.strategies import STRATEGIES, SearchResult, SearchSpec, search
from posttrain.search.voting import best_index, extract_answer, majority_vote, weighted_vote

__all__ = [
    "STRATEGIES",
    "SearchResult",
    "SearchSpec",
    "best_index",
    "extract_answer",
    "majority_vote",
    "search",
    "weighted_vote",
]
