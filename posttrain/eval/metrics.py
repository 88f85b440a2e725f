"""Evaluation metrics as pure functions.

>>> pass_at_k(n=4, c=1, k=2)   # 1 - C(3,2)/C(4,2) = 1 - 3/6
0.5
"""

from __future__ import annotations

from math import comb


def pass_at_k(*, n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021, eq. 1):
    1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def ks_up_to(n: int) -> list[int]:
    """1, 2, 4, ... up to n, plus n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]
