"""Theorem 1 of the paper's Appendix A, and its exact generalisation to relu6 and linear units.

For x != 0 and T with i.i.d. N(0, 1) entries, the pre-activations (Tx)_i are i.i.d. N(0, |x|^2), so
the number of active units is Binomial(n, p) with p = P(unit active):
relu p = 1/2 (Theorem 1: E[collapsed fraction] = sum_{k<d} C(n, k) / 2^n), relu6
p = Phi(6 / |x|) - 1/2 (0 < Tx < 6; averaged over the manifold's points), linear p = 1 (collapse only
when n < d, where the whole input loses rank).
"""

from __future__ import annotations

import math

import numpy as np


def binomial_below(n: int, d: int, p: float) -> float:
    """P(Binomial(n, p) < d)."""
    return float(sum(math.comb(n, k) * p**k * (1.0 - p) ** (n - k) for k in range(min(d, n + 1))))


def theorem1(n: int, d: int) -> float:
    """Theorem 1: the expected collapsed fraction sum_{k<d} C(n, k) / 2^n for ReLU of width n."""
    return float(sum(math.comb(n, k) for k in range(min(d, n + 1))) / 2.0**n)


def expected_collapsed_fraction(n: int, d: int, activation: str, norms: np.ndarray) -> float:
    """Expected fraction of points with fewer than d active units (see module docstring);
    ``norms`` are the points' norms (used by relu6 only)."""
    if activation == "relu":
        return theorem1(n, d)
    if activation == "linear":
        return 1.0 if n < d else 0.0
    if activation == "relu6":
        erf = np.vectorize(math.erf)
        p_active = 0.5 * erf(6.0 / (np.asarray(norms, np.float64) * math.sqrt(2.0)))
        return float(np.mean([binomial_below(n, d, p) for p in p_active]))
    raise ValueError(f"unknown activation {activation!r}")
