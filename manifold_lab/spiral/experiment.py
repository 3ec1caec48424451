"""The experiment as a library call: metrics (the JSON object), the one-draw back-projections and the
Theorem 1 sweep, plus writing the three output files."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from manifold_lab.atomic import atomic_savefig, atomic_write_json
from manifold_lab.spiral.kernel import ACTIVATIONS, draw_matrices, per_trial_metrics
from manifold_lab.spiral.manifolds import MANIFOLDS, make_manifold
from manifold_lab.spiral.theory import expected_collapsed_fraction

DEFAULT_DIMS = (2, 3, 5, 15, 30)
THEOREM_DIMS = tuple(range(1, 33))
TRUST_NEIGHBOURS = 5
LIMITS = {"dims": (1, 1024), "points": (2 * TRUST_NEIGHBOURS + 1, 5000), "trials": (2, 10000),
          "seed": (0, 2**31 - 1)}
SIGNIFICANT_DIGITS = 6
Z95 = 1.959963984540054
_NUMPY_ACTIVATIONS = {"relu": lambda z: np.maximum(z, 0.0), "relu6": lambda z: np.clip(z, 0.0, 6.0),
                      "linear": lambda z: z}


@dataclasses.dataclass(frozen=True)
class SpiralResult:
    """What one run produced. ``metrics`` is the ``spiral_metrics.json`` object; the rest feeds the
    figures: the input ``x`` [points, d] and ``position`` [points], ``back_projections`` (n ->
    ``T^+ act(T x)`` on trial 0, [points, d]) and ``theorem`` (per n = 1..32: measured collapsed
    fraction ``mean``, ``ci95`` [lo, hi] and Theorem 1 ``theory``)."""

    metrics: dict
    x: np.ndarray
    position: np.ndarray
    back_projections: dict[int, np.ndarray]
    theorem: dict[str, list]


def _round(value: float) -> float:
    """Round to a fixed number of significant digits so equal runs give byte-identical JSON."""
    return float(f"{float(value):.{SIGNIFICANT_DIGITS}g}")


def validate(dims: Sequence[int], points: int, trials: int, seed: int, activation: str,
             manifold: str) -> None:
    """Raise ``ValueError`` (one-line message) on any bad argument."""
    if not dims:
        raise ValueError("at least one dimension is needed")
    for name, values in (("dims", dims), ("points", [points]), ("trials", [trials]), ("seed", [seed])):
        lo, hi = LIMITS[name]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
                what = "each dims value" if name == "dims" else name
                raise ValueError(f"{what} must be an integer in [{lo}, {hi}], got {v!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
    if manifold not in MANIFOLDS:
        raise ValueError(f"unknown manifold {manifold!r}; choose from {', '.join(MANIFOLDS)}")


def _mean_ci(per_trial: np.ndarray) -> tuple[float, float, float]:
    """Mean over trials and its normal-approximation 95% interval, clipped to [0, 1]."""
    mean = float(per_trial.mean())
    half = Z95 * float(per_trial.std(ddof=1)) / math.sqrt(per_trial.size)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def back_project(x: np.ndarray, t: np.ndarray, activation: str) -> np.ndarray:
    """``T^+ act(T x)`` for every row of ``x`` (float64, one matrix ``t`` [n, d])."""
    t = np.asarray(t, np.float64)
    y = _NUMPY_ACTIVATIONS[activation](np.asarray(x, np.float64) @ t.T)
    return y @ np.linalg.pinv(t).T


def run_experiment(dims: Sequence[int] = DEFAULT_DIMS, points: int = 2000, trials: int = 1000,
                   seed: int = 0, activation: str = "relu", manifold: str = "spiral") -> SpiralResult:
    """Run the experiment (see the package docstring); raises ``ValueError`` on bad arguments."""
    from sklearn.manifold import trustworthiness

    validate(dims, points, trials, seed, activation, manifold)
    dims = [int(n) for n in dims]
    x, position = make_manifold(manifold, points, seed)
    d = x.shape[1]
    n_max = max(max(dims), THEOREM_DIMS[-1])
    per_trial = per_trial_metrics(x, seed, trials, n_max, activation)  # [n_max, 3, trials]
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    first_draw = np.asarray(draw_matrices(seed, 1, max(dims), d))[0]

    results, back_projections = [], {}
    for n in dims:
        mean, lo, hi = _mean_ci(per_trial[n - 1, 0])
        x_hat = back_project(x, first_draw[:n], activation)
        back_projections[n] = x_hat
        results.append({
            "dim": n,
            "collapsed_fraction": _round(mean),
            "collapsed_fraction_ci95": [_round(lo), _round(hi)],
            "theory_collapsed_fraction": _round(expected_collapsed_fraction(n, d, activation, norms)),
            "naive_error": _round(per_trial[n - 1, 1].mean()),
            "activeset_error": _round(per_trial[n - 1, 2].mean()),
            "trustworthiness": _round(trustworthiness(x, x_hat, n_neighbors=TRUST_NEIGHBOURS)),
        })
    theorem: dict[str, list] = {"dims": list(THEOREM_DIMS), "mean": [], "ci95": [], "theory": []}
    for n in THEOREM_DIMS:
        mean, lo, hi = _mean_ci(per_trial[n - 1, 0])
        theorem["mean"].append(mean)
        theorem["ci95"].append([lo, hi])
        theorem["theory"].append(expected_collapsed_fraction(n, d, activation, norms))
    metrics = {"manifold": manifold, "input_dim": d, "points": points, "trials": trials, "seed": seed,
               "activation": activation, "results": results}
    return SpiralResult(metrics, x, position, back_projections, theorem)


def format_table(metrics: dict) -> str:
    """The compact stdout table."""
    head = (f"{metrics['manifold']} (d={metrics['input_dim']}), {metrics['activation']}, "
            f"{metrics['points']} points x {metrics['trials']} trials, seed {metrics['seed']}")
    lines = [head, f"{'dim':>4}  {'collapsed [95% CI]':>28}  {'theorem':>9}  {'naive err':>9}  "
             f"{'active err':>10}  {'trust':>6}"]
    for r in metrics["results"]:
        lo, hi = r["collapsed_fraction_ci95"]
        lines.append(f"{r['dim']:>4}  {r['collapsed_fraction']:>9.3g} [{lo:>7.3g}, {hi:>7.3g}]  "
                     f"{r['theory_collapsed_fraction']:>9.3g}  {r['naive_error']:>9.3g}  "
                     f"{r['activeset_error']:>10.2g}  {r['trustworthiness']:>6.3f}")
    return "\n".join(lines)


def write_outputs(result: SpiralResult, out_dir: str | Path, figure_name: str = "spiral.png",
                  theorem_name: str = "spiral_theorem.png",
                  metrics_name: str = "spiral_metrics.json") -> list[Path]:
    """Write the two figures and the metrics JSON (each atomically, the JSON last) into ``out_dir``
    (created if needed); returns the paths written."""
    import matplotlib.pyplot as plt

    from manifold_lab.spiral.plotting import plot_panels, plot_theorem

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / figure_name, out / theorem_name, out / metrics_name]
    for fig, path in ((plot_panels(result), paths[0]), (plot_theorem(result), paths[1])):
        atomic_savefig(fig, path, dpi=110)
        plt.close(fig)
    atomic_write_json(paths[2], result.metrics)
    return paths
