"""The spiral experiment: ReLU on low-dimensional manifolds (MobileNetV2 paper, Fig. 1 and Appendix A).

A manifold x (a 2-D Archimedean spiral, or scikit-learn's 3-D swiss roll / S-curve; see
:mod:`.manifolds`) is embedded in R^n by T with i.i.d. N(0, 1) entries, passed through the activation
and projected back with the Moore-Penrose pseudo-inverse: ``x_hat = T^+ act(T x)``. Over many draws of T
and every n at once, :mod:`.kernel` measures (vectorised, no Python loop over trials or points):

* ``collapsed_fraction``: fraction of points with fewer than d active units (local rank < d); "active"
  means non-zero derivative: ``Tx > 0`` for relu, ``0 < Tx < 6`` for relu6, always for linear;
  mean over trials with a normal-approximation 95% interval across trials (clipped to [0, 1]; it is
  [0, 0] when no trial showed any collapse, i.e. when the expected count is far below one);
* ``theory_collapsed_fraction``: Theorem 1, sum_{k<d} C(n, k) / 2^n for relu (exact binomial
  generalisation for relu6 and linear, :mod:`.theory`);
* ``naive_error``: mean ||T^+ act(Tx) - x|| / ||x|| (what the figure shows). At n = d it is heavy
  tailed (T square, ||T^-1|| has infinite mean), so its mean there is noisy;
* ``activeset_error``: the same for the minimum-norm least-squares decoder on the active rows; zero
  (up to float32 round-off) wherever the active rows have rank d;
* ``trustworthiness``: ``sklearn.manifold.trustworthiness`` (5 neighbours) of the back-projection
  against the input, on one draw (trial 0).

Library API (used by the command line and by the figures command)::

    from manifold_lab.spiral import run_experiment, write_outputs, format_table
    result = run_experiment(dims=(2, 3, 5, 15, 30), points=2000, trials=1000, seed=0,
                            activation="relu", manifold="spiral")   # ValueError on bad arguments
    result.metrics            # the spiral_metrics.json object (floats rounded to 6 significant digits)
    write_outputs(result, "figures", figure_name="spiral.png", theorem_name="spiral_theorem.png",
                  metrics_name="spiral_metrics.json")              # atomic writes, JSON last
    print(format_table(result.metrics))

``result`` is a :class:`SpiralResult` (metrics plus the arrays the figures need);
:func:`plotting.plot_panels` and :func:`plotting.plot_theorem` return matplotlib Figures.
Same arguments give byte-identical JSON. :mod:`.reference` is a plain NumPy loop used as the test
oracle and the benchmark baseline.
"""

from manifold_lab.spiral.experiment import (DEFAULT_DIMS, SpiralResult, format_table, run_experiment,
                                            validate, write_outputs)
from manifold_lab.spiral.manifolds import MANIFOLDS, make_manifold

__all__ = ["DEFAULT_DIMS", "MANIFOLDS", "SpiralResult", "format_table", "make_manifold", "run_experiment",
           "validate", "write_outputs"]
