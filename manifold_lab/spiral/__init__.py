"""The spiral experiment: ReLU on low-dimensional manifolds (MobileNetV2 paper, Fig. 1 and Appendix A).

A manifold x (a 2-D Archimedean spiral, or scikit-learn's 3-D swiss roll / S-curve; see
:mod:`.manifolds`) is embedded in R^n by T (i.i.d. N(0, 1) entries unless the negative control below is
asked for), passed through the activation
and projected back with the Moore-Penrose pseudo-inverse: ``x_hat = T^+ act(T x)``. Over many draws of T
and every n at once, :mod:`.kernel` measures (vectorised, no Python loop over trials or points):

* ``collapsed_fraction``: fraction of points with fewer than d active units; "active" means non-zero
  derivative: ``Tx > 0`` for relu, ``0 < Tx < 6`` for relu6, always for linear. At such a point the
  map's Jacobian (T on the active rows) has rank < d: the d-dimensional neighbourhood of the point is
  squeezed onto a lower-dimensional set (the paper's Lemma 2 condition, at least d active units,
  fails). This is the quantity of Theorem 1. It is about the neighbourhood in R^d, not the curve's
  own information: a collapsed point of a 1-D curve may still keep its tangent direction.
  Mean over trials with a normal-approximation 95% interval across trials (clipped to [0, 1]; it is
  [0, 0] when no trial showed any collapse, i.e. when the expected count is far below one);
* ``theory_collapsed_fraction``: Theorem 1, sum_{k<d} C(n, k) / 2^n for relu (exact binomial
  generalisation for relu6 and linear, :mod:`.theory`), i.e. the expectation for a sign-symmetric T;
* ``law_collapsed_fraction``: the exact expectation for the law of T actually drawn (equal to the
  above for the Gaussian law);
* ``naive_error``: mean ||T^+ act(Tx) - x|| / ||x|| (what the figure shows). At n = d it is heavy
  tailed (T square, ||T^-1|| has infinite mean), so its mean there is noisy;
* ``activeset_error``: the same for the minimum-norm least-squares decoder on the active rows; zero
  (up to float32 round-off) wherever the active rows have rank d;
* ``trustworthiness``: ``sklearn.manifold.trustworthiness`` (5 neighbours) of the back-projection
  against the input, on one draw (trial 0).

Negative control. Theorem 1 needs the law of T to be invariant under sign flips of its rows.
``matrix="positive-mean"`` (``--matrix positive-mean``) draws T with i.i.d. N(1, 1) entries instead,
which breaks that condition: a unit's chance of being active then depends on the point's direction
and the measured collapsed fraction departs from the formula (e.g. about 0.17 instead of 0.0005 at
n = 15 on the spiral), while it still matches that law's own exact expectation. The metrics record
the law (``metrics["matrix"]``), and the Theorem 1 sweep (``result.theorem``, the second figure and
the report) always measures both laws, the second one with a cheap collapse-only pass.

Library API (used by the command line and by the figures command)::

    from manifold_lab.spiral import run_experiment, write_outputs, format_table
    result = run_experiment(dims=(2, 3, 5, 15, 30), points=2000, trials=1000, seed=0,
                            activation="relu", manifold="spiral",
                            matrix="gaussian")                      # ValueError on bad arguments
    result.metrics            # the spiral_metrics.json object (floats rounded to 6 significant digits)
    write_outputs(result, "figures", figure_name="spiral.png", theorem_name="spiral_theorem.png",
                  metrics_name="spiral_metrics.json")              # atomic writes, JSON last
    print(format_table(result.metrics))

``result`` is a :class:`SpiralResult` (metrics plus the arrays the figures need);
:func:`plotting.plot_panels` and :func:`plotting.plot_theorem` take those arrays and dicts and return
matplotlib Figures.
Same arguments give byte-identical JSON. :mod:`.reference` is a plain NumPy loop used as the test
oracle and the benchmark baseline.
"""

from __future__ import annotations

from manifold_lab.lazy import lazy_exports

#: The public names, imported on first use: plotting a saved result does not import JAX.
_EXPORTS: dict[str, str] = {
    "DEFAULT_DIMS": "manifold_lab.spiral.experiment", "SpiralResult": "manifold_lab.spiral.experiment",
    "format_table": "manifold_lab.spiral.experiment", "run_experiment": "manifold_lab.spiral.experiment",
    "validate": "manifold_lab.spiral.experiment", "write_outputs": "manifold_lab.spiral.experiment",
    "MANIFOLDS": "manifold_lab.spiral.manifolds", "make_manifold": "manifold_lab.spiral.manifolds",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
