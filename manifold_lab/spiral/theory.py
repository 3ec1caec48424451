"""Theorem 1 of the paper's Appendix A, its exact generalisation to relu6 and linear units, and the
laws of T the experiment draws from.

Theorem 1 assumes the law of T is invariant under sign flips of its rows (p(DB) = p(B) for every
diagonal sign matrix D). Then, for x != 0, each unit is active with probability 1/2 independently of
the others, the number of active units is Binomial(n, 1/2), and the expected fraction of points with
fewer than d active units ("collapsed", see :mod:`manifold_lab.spiral`) is sum_{k<d} C(n, k) / 2^n.

Laws of T (:data:`MATRIX_LAWS`), rows t_i i.i.d. with i.i.d. N(mu, 1) entries:

* ``gaussian``: mu = 0, sign-symmetric, Theorem 1 applies;
* ``positive-mean``: mu = :data:`CONTROL_MEAN` = 1, the negative control. Flipping a row's sign turns
  N(1, 1) entries into N(-1, 1) ones, so the condition fails. For a point x the pre-activation
  t_i . x is N(mu sum(x), |x|^2): the unit is active with probability p(x) = Phi(mu sum(x) / |x|),
  which depends on the point's direction (about 0.92 along (1, 1), 0.08 along (-1, -1)).

For either law the active count of a point is Binomial(n, p(x)), so the exact expected collapsed
fraction is the mean over the points of P(Binomial(n, p(x)) < d) (:func:`expected_collapsed_fraction`):
relu p = Phi(mu sum(x) / |x|) (1/2 for mu = 0: Theorem 1); relu6 (active when 0 < t.x < 6)
p = Phi((6 - mu sum(x)) / |x|) - Phi(-mu sum(x) / |x|); linear p = 1 (collapse only when n < d, where
the whole input loses rank). For the positive-mean law this mixture departs from Theorem 1 at every
n >= d except near n = 2d - 1, where a mixture of p and 1 - p in equal parts (a manifold symmetric
under x -> -x) gives 1/2 like the formula; below n = d both are 1.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

CONTROL_MEAN = 1.0
MATRIX_LAWS = {"gaussian": 0.0, "positive-mean": CONTROL_MEAN}  # law name -> mean of T's entries


def law_mean(law: str) -> float:
    """The mean mu of T's entries under ``law`` (one of :data:`MATRIX_LAWS`)."""
    if law not in MATRIX_LAWS:
        raise ValueError(f"unknown matrix law {law!r}; choose from {', '.join(MATRIX_LAWS)}")
    return MATRIX_LAWS[law]


def law_entries(law: str) -> str:
    """The entries' distribution under ``law`` as text, e.g. ``"i.i.d. N(1, 1)"``."""
    return f"i.i.d. N({law_mean(law):g}, 1)"


def theorem1(n: int, d: int) -> float:
    """Theorem 1: the expected collapsed fraction sum_{k<d} C(n, k) / 2^n for ReLU of width n."""
    return float(sum(math.comb(n, k) for k in range(min(d, n + 1))) / 2.0**n)


def p_active(x: np.ndarray, activation: str, mean: float = 0.0) -> np.ndarray:
    """Per point of ``x`` [points, d]: the probability that one unit is active when T's entries are
    i.i.d. N(mean, 1) (see module docstring)."""
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=1)
    shift = mean * x.sum(axis=1) / norms      # E[t.x] / sd(t.x)
    if activation == "relu":
        return stats.norm.cdf(shift)
    if activation == "relu6":
        return stats.norm.cdf(6.0 / norms - shift) - stats.norm.cdf(-shift)
    if activation == "linear":
        return np.ones(x.shape[0])
    raise ValueError(f"unknown activation {activation!r}")


def expected_collapsed_fraction(n: int, d: int, activation: str, x: np.ndarray, mean: float = 0.0) -> float:
    """Expected fraction of the points ``x`` [points, d] with fewer than d active units among n, for T
    with i.i.d. N(mean, 1) entries (see module docstring). relu with mean 0 is Theorem 1 exactly."""
    if activation == "relu" and mean == 0.0:
        return theorem1(n, d)
    if activation == "linear":
        return 1.0 if n < d else 0.0
    return float(np.mean(stats.binom.cdf(d - 1, n, p_active(x, activation, mean))))
