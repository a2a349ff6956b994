"""The unbiased pass@k estimator (Chen et al., 2021, "Evaluating Large Language Models Trained on Code").

With n samples of which c are correct, pass@k = 1 - C(n-c, k) / C(n, k): the chance that k samples
drawn without replacement contain a correct one. The binomials overflow floats for large n, so the
ratio is formed as the product prod_{i=n-c+1}^{n} (1 - k/i), each factor in [0, 1].
"""

from __future__ import annotations

from typing import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (0 <= c <= n, 1 <= k <= n)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"n={n}, c={c}, k={k}: need 0 <= c <= n and 1 <= k <= n (draw at most the n samples "
                         f"you have)")
    if n - c < k:  # every draw of k contains a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_at_k_curve(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[int, float]:
    """Mean pass@k over problems for each k in `ks`; `counts` holds (n, c) per problem.

    A k larger than some problem's n is an error (the estimator is undefined there).
    """
    counts = list(counts)
    if not counts:
        raise ValueError("counts is empty: pass one (n, c) pair per problem")
    return {k: sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}
