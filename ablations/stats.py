"""Statistics for the ablation report, on SciPy.

Design. Runs of different variants of a study with the same seed start from bit-identical
parameters and see the training data in the same order (the trainer derives both from the seed
alone), so the final accuracies are *paired* by seed. The primary analysis is therefore the paired
t test on the per-seed differences ``variant - reference`` (:func:`paired`): the seed-to-seed
variation shared by both variants cancels out of the differences, which is what makes a few seeds
informative. Welch's unpaired interval (:func:`welch`) stays available as a secondary column.

Multiple comparisons. A figure (one study) makes several comparisons at once; their family-wise
error rate is controlled by Holm's step-down procedure (:func:`holm`, :func:`holm_levels`,
:func:`holm_paired`). Each comparison is reported with its Holm-adjusted p value and a confidence
interval at the level of the Holm step that decides it: sort the m p values ascending; the
comparison ranked i (1-based) gets confidence ``1 - alpha / (m - i + 1)`` if every comparison
ranked before it was rejected, and otherwise the level of the step where the procedure stopped,
``1 - alpha / (m - k + 1)`` for the first non-rejected rank k (a wider interval, since it is
a higher confidence). With this choice an interval excludes 0 exactly when the Holm-adjusted p value is
below alpha, so the interval, the adjusted p value and the verdict never disagree. With a single
comparison this is the plain ``1 - alpha`` interval.

Power. :func:`detectable_effect` gives the smallest true mean difference that the paired test
detects with the requested power (80% by default) at the observed spread of the differences and
the number of pairs: the noncentral t power equation solved for the effect by root finding. It
says what a given number of seeds can resolve, which is what "not resolved at this scale" means.

Verdicts (:func:`verdict`): the (corrected) interval excludes 0 with the paper's sign ->
reproduced; with the opposite sign -> contradicted; otherwise -> not resolved at this scale.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize
from scipy import stats as sps

REPRODUCED = "reproduced"
CONTRADICTED = "contradicted"
NOT_RESOLVED = "not resolved at this scale"


def _t_quantile(confidence: float, df: float) -> float:
    """Two-sided Student-t critical value: ``P(|T| <= q) == confidence`` for ``df`` degrees of freedom."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(sps.t.ppf(0.5 + confidence / 2.0, df))


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


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Paired t analysis of the per-seed differences ``variant - reference``.

    ``diff`` is their mean, ``sd`` their sample sd, ``n`` the number of pairs; ``lo``/``hi`` the
    two-sided interval at ``confidence``; ``t`` and ``p`` the t statistic and the two-sided p value
    of "mean difference = 0". Bounds, ``sd``, ``t`` and ``p`` are ``None`` with fewer than two
    pairs. ``p_adjusted`` is the Holm-adjusted p value when the difference was analysed as part of a
    family (:func:`holm_paired`), else ``None``."""

    diff: float
    lo: float | None
    hi: float | None
    sd: float | None
    n: int
    t: float | None
    p: float | None
    confidence: float
    p_adjusted: float | None = None

    @property
    def df(self) -> int | None:
        return self.n - 1 if self.n >= 2 else None


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean and Student-t confidence interval of the mean of ``values`` (sample sd, n - 1 dof)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("mean_ci needs a non-empty 1-D sequence")
    mean = float(x.mean())
    if x.size < 2:
        return Estimate(mean, None, None, int(x.size), None)
    sd = float(x.std(ddof=1))
    half = _t_quantile(confidence, x.size - 1) * sd / math.sqrt(x.size)
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
    half = _t_quantile(confidence, c.shape[0] - 1) * c.std(axis=0, ddof=1) / math.sqrt(c.shape[0])
    return mean, mean - half, mean + half


def welch(variant: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> Difference:
    """Welch's t interval for ``mean(variant) - mean(baseline)`` (unpaired, unequal variances,
    Welch-Satterthwaite degrees of freedom).

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
    half = _t_quantile(confidence, df) * math.sqrt(se2)
    return Difference(diff, diff - half, diff + half, df, int(a.size), int(b.size))


def paired(variant: Sequence[float], reference: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """Paired t test and interval for the mean of ``variant[i] - reference[i]`` (same seed order).

    Raises ``ValueError`` on unequal or zero lengths. With zero variance of the differences the
    interval degenerates to the mean difference, the t statistic is infinite (0 when the mean is 0)
    and p is 0 when the mean differs from 0, else 1."""
    a = np.asarray(variant, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired needs two 1-D sequences of equal length, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired needs at least one pair")
    d = a - b
    n, mean = int(d.size), float(d.mean())
    if n < 2:
        return PairedDifference(mean, None, None, None, n, None, None, confidence)
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        t = math.copysign(math.inf, mean) if mean != 0.0 else 0.0
        return PairedDifference(mean, mean, mean, 0.0, n, t, 0.0 if mean != 0.0 else 1.0, confidence)
    se = sd / math.sqrt(n)
    t = mean / se
    p = float(2.0 * sps.t.sf(abs(t), n - 1))
    half = _t_quantile(confidence, n - 1) * se
    return PairedDifference(mean, mean - half, mean + half, sd, n, t, p, confidence)


def _ranked(p_values: Sequence[float | None]) -> list[int]:
    """Indices of the non-``None`` p values in ascending order of p (stable for ties)."""
    return sorted((i for i, p in enumerate(p_values) if p is not None), key=lambda i: p_values[i])


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p values, in the input order.

    The k-th smallest of the m p values (``None`` entries excluded from m and passed through) is
    adjusted to ``max_{j <= k} min(1, (m - j + 1) p_(j))``: monotone in p and capped at 1. A
    comparison is rejected at family-wise level alpha when its adjusted p value is below alpha."""
    order = _ranked(p_values)
    m = len(order)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        out[i] = running
    return out


def holm_levels(p_values: Sequence[float | None], alpha: float = 0.05) -> list[float | None]:
    """Confidence level of each comparison's Holm-step interval (see the module docstring).

    The comparison ranked i (0-based, ascending p) among m gets ``1 - alpha / (m - min(i, k))``,
    k being the first rank the step-down procedure does not reject (m when it rejects all), so the
    interval excludes 0 exactly when the Holm-adjusted p value is below alpha. ``None`` p values
    (no test possible) get ``None``."""
    order = _ranked(p_values)
    m = len(order)
    stop = next((rank for rank, i in enumerate(order) if float(p_values[i]) >= alpha / (m - rank)), m)
    out: list[float | None] = [None] * len(p_values)
    for rank, i in enumerate(order):
        out[i] = 1.0 - alpha / (m - min(rank, stop))
    return out


def holm_paired(pairs: Sequence[tuple[Sequence[float], Sequence[float]]],
                alpha: float = 0.05) -> list[PairedDifference]:
    """:func:`paired` for a family of (variant, reference) samples, Holm-corrected together.

    Each result carries its raw two-sided ``p``, its Holm-adjusted ``p_adjusted`` and its interval
    at the Holm-step level of :func:`holm_levels` (``confidence``). Comparisons with fewer than two
    pairs stay uncorrected and without interval; they do not count in the family size."""
    raw = [paired(v, r, 1.0 - alpha) for v, r in pairs]
    adjusted = holm([d.p for d in raw])
    levels = holm_levels([d.p for d in raw], alpha)
    out = []
    for (v, r), d, p_adj, level in zip(pairs, raw, adjusted, levels):
        corrected = d if level is None else paired(v, r, level)
        out.append(dataclasses.replace(corrected, p_adjusted=p_adj))
    return out


def _paired_power(effect: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired t test at level ``alpha`` with ``n`` pairs against a true mean
    difference of ``effect`` standard deviations of the differences (noncentral t)."""
    df = n - 1
    crit = float(sps.t.ppf(1.0 - alpha / 2.0, df))
    nc = effect * math.sqrt(n)
    upper = float(sps.nct.sf(crit, df, nc))
    if not math.isfinite(upper):
        upper = 1.0 - float(sps.nct.cdf(crit, df, nc))
    # The wrong-sign tail is at most alpha / 2 and vanishes as nc grows, where SciPy's series can
    # return NaN for it: count it as 0 there.
    lower = float(sps.nct.cdf(-crit, df, nc))
    return upper + (lower if math.isfinite(lower) else 0.0)


def detectable_effect(sd_diff: float | None, n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Smallest true mean difference that a two-sided paired t test at level ``alpha`` with ``n``
    pairs detects with probability ``power``, when the differences have sd ``sd_diff``.

    Solves the noncentral t power equation for the effect with Brent's method. ``None`` when
    ``n < 2`` or ``sd_diff`` is ``None``; 0 when ``sd_diff`` is 0 (any difference is detected)."""
    if sd_diff is None or n < 2:
        return None
    if not 0.0 < alpha < power < 1.0:
        raise ValueError(f"need 0 < alpha < power < 1, got alpha={alpha}, power={power}")
    if sd_diff == 0.0:
        return 0.0
    hi = (float(sps.norm.ppf(1.0 - alpha / 2.0)) + float(sps.norm.ppf(power))) / math.sqrt(n)
    while _paired_power(hi, n, alpha) < power:
        hi *= 2.0
    effect = optimize.brentq(lambda e: _paired_power(e, n, alpha) - power, 0.0, hi, xtol=1e-12, rtol=1e-12)
    return float(effect) * abs(float(sd_diff))


def verdict(difference: Difference | PairedDifference, paper_diff: float) -> str:
    """Plain verdict: the interval excludes 0 with the paper's sign -> reproduced; with the
    opposite sign -> contradicted; otherwise (or without an interval) not resolved."""
    if difference.lo is None or difference.hi is None or paper_diff == 0:
        return NOT_RESOLVED
    if difference.lo > 0 or difference.hi < 0:
        return REPRODUCED if (difference.lo > 0) == (paper_diff > 0) else CONTRADICTED
    return NOT_RESOLVED
