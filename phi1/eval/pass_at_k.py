"""The unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code").

With n samples of which c pass, pass@k = 1 - C(n - c, k) / C(n, k): the chance that k samples drawn without
replacement from the n contain at least one that passes. Computed as a product so that n = 200 does not
overflow: C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i).
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `n` samples, `c` of them correct.

    Raises ValueError unless 0 <= c <= n and 1 <= k <= n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} needs at least k samples per problem (n={n})")
    if n - c < k:
        return 1.0  # every draw of k samples includes a correct one
    ratio = 1.0
    for i in range(n - c + 1, n + 1):
        ratio *= 1.0 - k / i
    return 1.0 - ratio


def mean_pass_at_k(samples_per_problem: Sequence[int], correct_per_problem: Sequence[int], k: int) -> float:
    """pass@k averaged over problems (each problem's n may differ, but must be >= k)."""
    if len(samples_per_problem) != len(correct_per_problem):
        raise ValueError("mean_pass_at_k: one n and one c per problem")
    if not samples_per_problem:
        raise ValueError("mean_pass_at_k: no problems")
    values = [pass_at_k(n, c, k) for n, c in zip(samples_per_problem, correct_per_problem)]
    return sum(values) / len(values)
