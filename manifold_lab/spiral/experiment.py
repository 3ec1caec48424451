"""The experiment as a library call: metrics (the JSON object), the one-draw back-projections and the
Theorem 1 sweep for the Gaussian law of T and the positive-mean control, plus writing the three output
files. A point counts as collapsed when fewer than d of its units are active (:mod:`.kernel`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from manifold_lab.atomic import atomic_savefig, atomic_write_json
from manifold_lab.spiral.kernel import ACTIVATIONS, collapsed_per_trial, matrices, per_trial_metrics
from manifold_lab.spiral.manifolds import MANIFOLDS, make_manifold
from manifold_lab.spiral.theory import MATRIX_LAWS, expected_collapsed_fraction, law_entries, law_mean

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
    ``T^+ act(T x)`` on trial 0 under the run's law, [points, d]) and ``theorem`` (per n = 1..32, for
    T with N(0, 1) entries: measured collapsed fraction ``mean``, ``ci95`` [lo, hi] and its expected
    value ``theory``, Theorem 1 for relu; the same for the positive-mean control as ``control_mean``,
    ``control_ci95``, ``control_theory`` (exact for that law), with ``control_law`` its entries' law)."""

    metrics: dict
    x: np.ndarray
    position: np.ndarray
    back_projections: dict[int, np.ndarray]
    theorem: dict[str, Any]


def _round(value: float) -> float:
    """Round to a fixed number of significant digits so equal runs give byte-identical JSON."""
    return float(f"{float(value):.{SIGNIFICANT_DIGITS}g}")


def validate(dims: Sequence[int], points: int, trials: int, seed: int, activation: str,
             manifold: str, matrix: str = "gaussian") -> None:
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
    if matrix not in MATRIX_LAWS:
        raise ValueError(f"unknown matrix law {matrix!r}; choose from {', '.join(MATRIX_LAWS)}")


def matrix_description(matrix: str) -> dict[str, Any]:
    """The ``matrix`` entry of the metrics: the law's name, its entries, and whether it is
    sign-symmetric (Theorem 1 applies) or the negative control."""
    symmetric = law_mean(matrix) == 0.0
    role = ("Theorem 1 applies" if symmetric else
            "negative control: sign symmetry of the rows of T broken, Theorem 1 does not apply")
    return {"law": matrix, "entries": law_entries(matrix), "sign_symmetric": symmetric, "role": role}


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


def _result_row(n: int, per_trial: np.ndarray, x: np.ndarray, x_hat: np.ndarray, activation: str,
                mean: float) -> dict[str, Any]:
    """One entry of ``metrics["results"]``; ``per_trial`` is ``[3, trials]`` for width n."""
    from sklearn.manifold import trustworthiness

    collapsed, lo, hi = _mean_ci(per_trial[0])
    d = x.shape[1]
    return {
        "dim": n,
        "collapsed_fraction": _round(collapsed),
        "collapsed_fraction_ci95": [_round(lo), _round(hi)],
        "theory_collapsed_fraction": _round(expected_collapsed_fraction(n, d, activation, x)),
        "law_collapsed_fraction": _round(expected_collapsed_fraction(n, d, activation, x, mean)),
        "naive_error": _round(per_trial[1].mean()),
        "activeset_error": _round(per_trial[2].mean()),
        "trustworthiness": _round(trustworthiness(x, x_hat, n_neighbors=TRUST_NEIGHBOURS)),
    }


def _theorem_sweep(x: np.ndarray, seed: int, trials: int, activation: str, matrix: str,
                   run_collapsed: np.ndarray) -> dict[str, Any]:
    """``SpiralResult.theorem``: both laws over n = 1..32. ``run_collapsed`` [>= 32, trials] is the
    run's own law's collapsed fraction per trial; the other law is measured here (collapse only)."""
    n_max, d = THEOREM_DIMS[-1], x.shape[1]
    theorem: dict[str, Any] = {"dims": list(THEOREM_DIMS), "control_law": law_entries("positive-mean")}
    for law, prefix in (("gaussian", ""), ("positive-mean", "control_")):
        mu = law_mean(law)
        per_trial = (run_collapsed[:n_max] if law == matrix
                     else collapsed_per_trial(x, seed, trials, n_max, activation, mu))
        estimates = [_mean_ci(per_trial[n - 1]) for n in THEOREM_DIMS]
        theorem[prefix + "mean"] = [m for m, _, _ in estimates]
        theorem[prefix + "ci95"] = [[lo, hi] for _, lo, hi in estimates]
        theorem[prefix + "theory"] = [expected_collapsed_fraction(n, d, activation, x, mu)
                                      for n in THEOREM_DIMS]
    return theorem


def run_experiment(dims: Sequence[int] = DEFAULT_DIMS, points: int = 2000, trials: int = 1000,
                   seed: int = 0, activation: str = "relu", manifold: str = "spiral",
                   matrix: str = "gaussian") -> SpiralResult:
    """Run the experiment (see the package docstring) with T's law ``matrix`` (``"gaussian"`` or the
    ``"positive-mean"`` control); the Theorem 1 sweep always covers both laws. Raises ``ValueError``
    on bad arguments."""
    validate(dims, points, trials, seed, activation, manifold, matrix)
    dims = [int(n) for n in dims]
    x, position = make_manifold(manifold, points, seed)
    d, mu = x.shape[1], law_mean(matrix)
    n_max = max(max(dims), THEOREM_DIMS[-1])
    per_trial = per_trial_metrics(x, seed, trials, n_max, activation, mu)  # [n_max, 3, trials]
    first_draw = matrices(seed, 1, max(dims), d, mu)[0]
    back_projections = {n: back_project(x, first_draw[:n], activation) for n in dims}
    results = [_result_row(n, per_trial[n - 1], x, back_projections[n], activation, mu) for n in dims]
    metrics = {"manifold": manifold, "input_dim": d, "points": points, "trials": trials, "seed": seed,
               "activation": activation, "matrix": matrix_description(matrix), "results": results}
    theorem = _theorem_sweep(x, seed, trials, activation, matrix, per_trial[:, 0])
    return SpiralResult(metrics, x, position, back_projections, theorem)


def format_table(metrics: dict) -> str:
    """The compact stdout table. Under the positive-mean law it opens with a NEGATIVE CONTROL line
    and adds the exact expectation for that law (``this law``) next to the Theorem 1 column."""
    matrix = metrics["matrix"]
    control = not matrix["sign_symmetric"]
    head = (f"{metrics['manifold']} (d={metrics['input_dim']}), {metrics['activation']}, T entries "
            f"{matrix['entries']}, {metrics['points']} points x {metrics['trials']} trials, "
            f"seed {metrics['seed']}")
    lines = ["NEGATIVE CONTROL: T's rows are not sign-symmetric, so Theorem 1 does not apply: expect "
             "departures from 'theorem'; 'this law' is the exact expectation for this T", head]
    lines = lines if control else lines[1:]
    lines.append(f"{'dim':>4}  {'collapsed [95% CI]':>28}  {'theorem':>9}  "
                 + (f"{'this law':>9}  " if control else "")
                 + f"{'naive err':>9}  {'active err':>10}  {'trust':>6}")
    for r in metrics["results"]:
        lo, hi = r["collapsed_fraction_ci95"]
        law = f"{r['law_collapsed_fraction']:>9.3g}  " if control else ""
        lines.append(f"{r['dim']:>4}  {r['collapsed_fraction']:>9.3g} [{lo:>7.3g}, {hi:>7.3g}]  "
                     f"{r['theory_collapsed_fraction']:>9.3g}  {law}{r['naive_error']:>9.3g}  "
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
    figures = (plot_panels(result.x, result.position, result.back_projections, result.metrics),
               plot_theorem(result.theorem, result.metrics))
    for fig, path in zip(figures, paths):
        atomic_savefig(fig, path, dpi=110)
        plt.close(fig)
    atomic_write_json(paths[2], result.metrics)
    return paths
