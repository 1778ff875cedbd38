"""pass@k: the unbiased estimator of Chen et al. 2021 (HumanEval, arXiv 2107.03374).

With n samples per problem of which c are correct, the chance that at least one of k samples
drawn without replacement is correct is

    pass@k = 1 - C(n - c, k) / C(n, k)

averaged over problems. Sampling n > k and using this estimator has much less variance than
drawing exactly k samples and checking "any correct". pass@1 reduces to c / n, the mean accuracy
of a sample, which is what R1 reports as "pass@1" (k samples at temperature 0.6, averaged).
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """The estimate for one problem with `c` correct out of `n` samples (k <= n)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): no huge binomials, no overflow
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(correct: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over problems; `correct[i]` is problem i's number of correct samples."""
    if not correct:
        return 0.0
    return sum(pass_at_k(n, c, k) for c in correct) / len(correct)


def report_ks(n: int) -> list[int]:
    """The k worth reporting for n samples: 1, 2, 4, ... below n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]
