"""pass@k: the unbiased estimator against the direct binomial formula and by enumeration."""

import itertools
from math import comb

import pytest

from nanoseek.eval.passk import mean_pass_at_k, pass_at_k, report_ks


@pytest.mark.parametrize("n", [1, 2, 5, 10, 16])
def test_estimator_matches_the_binomial_formula(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            want = 1 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_estimator_is_the_share_of_k_subsets_with_a_correct_sample():
    n, c = 6, 2
    outcomes = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(outcomes, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_special_cases_and_large_n():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # only 4 wrong: any 5 hold a right one
    assert 0.0 < pass_at_k(1000, 1, 100) < 1.0  # no overflow with huge binomials
    assert mean_pass_at_k([0, 2, 4], 4, 1) == pytest.approx((0 + 0.5 + 1) / 3)
    assert mean_pass_at_k([], 4, 2) == 0.0
    assert report_ks(8) == [1, 2, 4, 8] and report_ks(6) == [1, 2, 4, 6] and report_ks(1) == [1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)
