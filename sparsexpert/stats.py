"""Statistics for comparisons a reviewer accepts: intervals over seeds, paired tests, bootstrap over
evaluation examples. No SciPy needed (tests check these against it where it is installed).

    summary([0.81, 0.79, 0.84])            # mean, sd, n, 95% Student-t interval
    paired_t([0.81, 0.79, 0.84], [0.78, 0.80, 0.80])   # mean difference, its interval, t, p (two-sided)
    paired_bootstrap(correct_a, correct_b, metric=np.mean, seed=0)  # one run each, per-example scores

Student's t comes from the regularized incomplete beta function (a continued fraction, as in Numerical
Recipes' betacf, to about 1e-12); its quantile by bisection on that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x}: must be in [0, 1]")
    if x in (0.0, 1.0):
        return x
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t with df degrees of freedom (bisection on t_cdf)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q={q}: must be in (0, 1)")
    if q == 0.5:
        return 0.0
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


@dataclass
class Summary:
    mean: float
    sd: float
    """Sample standard deviation (n - 1); 0 for one value."""
    n: int
    lo: float
    """The 95% interval of the mean (Student t, n - 1 degrees of freedom); nan for one value."""
    hi: float

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.4f} (n=1)"
        return f"{self.mean:.4f} ± {self.sd:.4f} [{self.lo:.4f}, {self.hi:.4f}]"


def summary(values: Sequence[float], level: float = 0.95) -> Summary:
    x = np.asarray(values, dtype=np.float64)
    if not len(x):
        raise ValueError("summary of no values")
    mean = float(x.mean())
    if len(x) < 2:
        return Summary(mean, 0.0, 1, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = t_ppf(0.5 + level / 2.0, len(x) - 1) * sd / math.sqrt(len(x))
    return Summary(mean, sd, len(x), mean - half, mean + half)


@dataclass
class Paired:
    diff: float
    """mean of a - b"""
    lo: float
    hi: float
    """The interval of the mean difference (level as asked)."""
    p: float
    """Two-sided p-value of no difference."""
    n: int
    statistic: float
    """t (paired t-test); the observed difference (bootstrap)."""

    def __str__(self) -> str:
        return f"{self.diff:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}] p={self.p:.3g}"


def paired_t(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Paired:
    """The paired t-test of a against b (one pair per seed): the mean difference, its interval and the
    two-sided p-value. With identical differences the p-value is 0 (any difference) or 1 (none)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) < 2:
        raise ValueError(f"a paired t-test needs 2 pairs or more, got {len(d)}")
    n, mean, sd = len(d), float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return Paired(
            mean, mean, mean, 1.0 if mean == 0 else 0.0, n, math.copysign(math.inf, mean) if mean else 0.0
        )
    se = sd / math.sqrt(n)
    t = mean / se
    p = 2.0 * t_cdf(-abs(t), n - 1)
    half = t_ppf(0.5 + level / 2.0, n - 1) * se
    return Paired(mean, mean - half, mean + half, min(1.0, p), n, t)


def bootstrap_diff(
    n: int,
    metric_a: Callable[[np.ndarray], float],
    metric_b: Callable[[np.ndarray], float],
    samples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Paired:
    """paired_bootstrap for metrics that are not a reduction of per-example scores (entity F1 over
    sentences, micro F1 over relation examples): metric_x(indices) scores system x on those of the n
    evaluation examples; both are scored on the same resamples."""
    if n < 1:
        raise ValueError("bootstrap over no examples")
    rng = np.random.default_rng(seed)
    everything = np.arange(n)
    observed = float(metric_a(everything)) - float(metric_b(everything))
    diffs = np.empty(samples)
    for k in range(samples):
        idx = rng.integers(0, n, n)
        diffs[k] = float(metric_a(idx)) - float(metric_b(idx))
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    other_side = float(np.mean(diffs <= 0)) if observed > 0 else float(np.mean(diffs >= 0))
    p = 1.0 if observed == 0 else min(1.0, max(2.0 * other_side, 1.0 / samples))
    return Paired(observed, float(lo), float(hi), p, n, observed)


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    metric: Callable[[np.ndarray], float] = np.mean,
    samples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Paired:
    """One run of each system scored on the same evaluation examples (a[i], b[i]: per-example scores or
    rows that `metric` reduces): the examples are resampled with replacement, the same resample for both;
    the percentile interval of metric(a) - metric(b) and the two-sided p-value of no difference (twice the
    share of resamples on the other side of 0, the paired bootstrap of Koehn 2004 / Berg-Kirkpatrick et al.
    2012, at least 1 / samples)."""
    x, y = np.asarray(a), np.asarray(b)
    if len(x) != len(y) or not len(x):
        raise ValueError(f"paired bootstrap: {len(x)} and {len(y)} examples")
    return bootstrap_diff(len(x), lambda i: metric(x[i]), lambda i: metric(y[i]), samples, seed, level)
