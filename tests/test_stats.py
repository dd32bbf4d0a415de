"""sparsexpert/stats.py against SciPy and against values computed by hand."""

import math

import numpy as np
import pytest

from sparsexpert import stats


def test_student_t_against_scipy():
    sp = pytest.importorskip("scipy.stats")
    special = pytest.importorskip("scipy.special")
    for df in (1, 2, 3, 4, 7, 19, 99, 1000):
        for q in (0.005, 0.025, 0.1, 0.5, 0.9, 0.975, 0.995):
            assert stats.t_ppf(q, df) == pytest.approx(sp.t.ppf(q, df), rel=1e-9, abs=1e-9), (q, df)
        for t in (-40.0, -3.2, -1.0, -1e-3, 0.0, 0.7, 2.5, 12.0):
            assert stats.t_cdf(t, df) == pytest.approx(sp.t.cdf(t, df), rel=1e-9, abs=1e-12), (t, df)
    for a, b, x in ((0.5, 0.5, 0.3), (2.0, 5.0, 0.9), (50.0, 0.5, 0.999), (0.5, 30.0, 1e-4)):
        assert stats.betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-10)


def test_summary_and_paired_t_by_hand_and_against_scipy():
    # by hand: values 1, 2, 3 -> mean 2, sd 1, t(0.975, 2) = 4.302653, half width 4.302653 / sqrt(3)
    s = stats.summary([1.0, 2.0, 3.0])
    assert (s.mean, s.sd, s.n) == (2.0, 1.0, 3)
    assert s.hi - s.mean == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-10)
    assert str(s) == "2.0000 ± 1.0000 [-0.4841, 4.4841]"  # 2 ± 2.48414
    one = stats.summary([0.5])
    assert one.n == 1 and math.isnan(one.lo) and str(one) == "0.5000 (n=1)"
    # paired: differences 0.1, 0.3, 0.2, 0.2 -> mean 0.2, sd sqrt(0.02/3), t = 0.2 / (sd / 2)
    a, b = [0.9, 0.8, 0.7, 0.6], [0.8, 0.5, 0.5, 0.4]
    p = stats.paired_t(a, b)
    sd = math.sqrt(0.02 / 3)
    assert p.diff == pytest.approx(0.2) and p.statistic == pytest.approx(0.2 / (sd / 2), rel=1e-9)
    sp = pytest.importorskip("scipy.stats")
    ref = sp.ttest_rel(a, b)
    assert p.statistic == pytest.approx(ref.statistic, rel=1e-9) and p.p == pytest.approx(
        ref.pvalue, rel=1e-8
    )
    ci = ref.confidence_interval(0.95)
    assert (p.lo, p.hi) == (pytest.approx(ci.low, rel=1e-8), pytest.approx(ci.high, rel=1e-8))
    assert stats.paired_t([1, 2], [1, 2]).p == 1.0 and stats.paired_t([2, 3], [1, 2]).p == 0.0
    with pytest.raises(ValueError, match="2 pairs or more"):
        stats.paired_t([1.0], [0.0])


def test_paired_bootstrap_finds_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    n = 400
    a = (rng.random(n) < 0.8).astype(float)  # system a right on 80% of the examples
    b = np.where(rng.random(n) < 0.5, a, (rng.random(n) < 0.6).astype(float))  # b worse on a share
    r = stats.paired_bootstrap(a, b, samples=2000, seed=1)
    assert r.diff == pytest.approx(a.mean() - b.mean()) and r.lo < r.diff < r.hi
    assert r.diff > 0 and r.p < 0.01 and r.lo > 0
    same = stats.paired_bootstrap(a, a.copy(), samples=500)
    assert same.diff == 0 and same.p == 1.0
    # a coin flip's worth of difference: not significant
    c = np.where(rng.random(n) < 0.02, 1 - a, a)
    assert stats.paired_bootstrap(a, c, samples=2000, seed=2).p > 0.05
    # the same seed, the same answer
    assert stats.paired_bootstrap(a, b, samples=300, seed=5) == stats.paired_bootstrap(
        a, b, samples=300, seed=5
    )
