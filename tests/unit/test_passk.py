"""The unbiased pass@k estimator against closed forms and brute-force enumeration."""

import itertools
import math

import pytest

from megatron_s2l.algo.passk import pass_at_k, pass_at_k_curve


def _enumerated(n, c, k):
    """The fraction of k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n, c, k", [(5, 2, 1), (5, 2, 2), (5, 2, 3), (5, 2, 4), (6, 1, 3), (7, 3, 2),
                                     (8, 0, 4), (8, 8, 1), (8, 5, 8), (4, 1, 4)])
def test_matches_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_enumerated(n, c, k), abs=1e-12)


def test_closed_forms():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(16, 0, 16) == 0.0  # no correct sample
    assert pass_at_k(16, 16, 1) == 1.0  # all correct
    assert pass_at_k(16, 1, 16) == 1.0  # k = n: the one correct sample is always drawn


def test_large_n_is_stable():
    # C(1000, 500) overflows floats; the product form stays exact enough.
    expected = 1 - math.comb(900, 500) / math.comb(1000, 500)
    assert pass_at_k(1000, 100, 500) == pytest.approx(expected, rel=1e-12)
    assert pass_at_k(10_000, 1, 1) == pytest.approx(1e-4, rel=1e-12)


def test_curve_is_the_mean_over_problems_and_grows_with_k():
    curve = pass_at_k_curve([(4, 1), (4, 0), (4, 4)], ks=[1, 2, 4])
    # problem 1: 1/4, 1/2, 1; problem 2: 0; problem 3: 1
    assert curve == pytest.approx({1: (0.25 + 0 + 1) / 3, 2: (0.5 + 0 + 1) / 3, 4: (1 + 0 + 1) / 3})


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_bad_arguments(n, c, k):
    with pytest.raises(ValueError, match=f"n={n}, c={c}, k={k}"):
        pass_at_k(n, c, k)
    with pytest.raises(ValueError, match="counts is empty"):
        pass_at_k_curve([], ks=[1])
