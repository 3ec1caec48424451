"""Small, dependency-free statistics for the ablation report.

Everything the report states about uncertainty comes from here: Student-t confidence intervals of a
mean over seeds, Welch's interval for the difference of two means (unequal variances,
Welch-Satterthwaite degrees of freedom), and the verdict rule that turns an interval into words.
The Student-t quantile is computed from the regularised incomplete beta function (Lentz's continued
fraction) and bisection, so no SciPy is needed at run time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

REPRODUCED = "reproduced"
CONTRADICTED = "contradicted"
NOT_RESOLVED = "not resolved at this scale"


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1.

    ``y`` may pass ``1 - x`` computed without cancellation (x close to 1)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    y = 1.0 - x if y is None else y
    if x == 0.0 or y == 0.0:
        return 0.0 if x == 0.0 else 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def t_cdf(t: float, df: float) -> float:
    """Cumulative distribution function of Student's t with ``df`` (> 0, may be fractional) degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    denom = df + t * t
    tail = 0.5 * betainc(df / 2.0, 0.5, df / denom, t * t / denom)
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t: the t with ``t_cdf(t, df) == p`` (bisection to machine precision)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` seeds with its two-sided confidence interval (``None`` when n < 2)."""

    mean: float
    lo: float | None
    hi: float | None
    n: int
    sd: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.hi is None else (self.hi - self.lo) / 2.0


@dataclasses.dataclass(frozen=True)
class Difference:
    """Welch interval for ``mean(variant) - mean(baseline)`` (``None`` bounds when not computable)."""

    diff: float
    lo: float | None
    hi: float | None
    df: float | None
    n_variant: int
    n_baseline: int


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean and Student-t confidence interval of the mean of ``values`` (sample sd, n - 1 dof)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("mean_ci needs a non-empty 1-D sequence")
    mean = float(x.mean())
    if x.size < 2:
        return Estimate(mean, None, None, int(x.size), None)
    sd = float(x.std(ddof=1))
    half = t_ppf(0.5 + confidence / 2.0, x.size - 1) * sd / math.sqrt(x.size)
    return Estimate(mean, mean - half, mean + half, int(x.size), sd)


def band(curves: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise mean and t confidence band of ``curves`` [seeds, points]; with one seed the band
    collapses onto the mean."""
    c = np.asarray(curves, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] == 0:
        raise ValueError("band needs a [seeds, points] array with at least one seed")
    mean = c.mean(axis=0)
    if c.shape[0] < 2:
        return mean, mean.copy(), mean.copy()
    half = t_ppf(0.5 + confidence / 2.0, c.shape[0] - 1) * c.std(axis=0, ddof=1) / math.sqrt(c.shape[0])
    return mean, mean - half, mean + half


def welch(variant: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> Difference:
    """Welch's t interval for ``mean(variant) - mean(baseline)``.

    Needs at least two values on each side; otherwise the bounds are ``None``. When both samples have
    zero variance the interval degenerates to the point difference."""
    a = np.asarray(variant, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("welch needs non-empty samples")
    diff = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return Difference(diff, None, None, None, int(a.size), int(b.size))
    va, vb = float(a.var(ddof=1)) / a.size, float(b.var(ddof=1)) / b.size
    se2 = va + vb
    if se2 == 0.0:
        return Difference(diff, diff, diff, math.inf, int(a.size), int(b.size))
    df = se2 * se2 / (va * va / (a.size - 1) + vb * vb / (b.size - 1))
    half = t_ppf(0.5 + confidence / 2.0, df) * math.sqrt(se2)
    return Difference(diff, diff - half, diff + half, df, int(a.size), int(b.size))


def verdict(difference: Difference, paper_diff: float) -> str:
    """Plain verdict: the interval excludes 0 with the paper's sign -> reproduced; with the
    opposite sign -> contradicted; otherwise (or without an interval) not resolved."""
    if difference.lo is None or difference.hi is None or paper_diff == 0:
        return NOT_RESOLVED
    if difference.lo > 0 or difference.hi < 0:
        return REPRODUCED if (difference.lo > 0) == (paper_diff > 0) else CONTRADICTED
    return NOT_RESOLVED
