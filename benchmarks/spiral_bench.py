"""Benchmark: the full spiral sweep (n = 1..32 x 1000 trials x 2000 points, relu, d = 2).

Times ``manifold_lab.spiral.kernel.per_trial_metrics`` (drawing T, all three per-trial metrics for every
n, float64) after a warm-up call that compiles it, as the median of repeats with the min-max spread, and
in the same run two plain NumPy loops from ``manifold_lab.spiral.reference`` on the same draws:

* "NumPy, user loop": for each n and trial, pinv for the naive decoder and one ``np.linalg.lstsq`` per
  point for the active-set decoder (as a user would write it);
* "NumPy, loop over n x trials": the same with the active-set step vectorised over the points.

Columns: median wall seconds, min-max spread, median process CPU seconds (all threads; less sensitive
to other work on the machine than wall time), and the ratio of medians to JAX.

Both loops are far too slow for the full sweep, so they run on the first ``--baseline-trials`` trials of
every n and are scaled linearly to the full trial count (the output says so). The baselines' metrics are
checked against the JAX ones on those trials.

    .venv/bin/python benchmarks/spiral_bench.py [--trials 1000 --points 2000 --repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from manifold_lab.spiral.kernel import draw_matrices, per_trial_metrics  # noqa: E402
from manifold_lab.spiral.manifolds import make_manifold  # noqa: E402
from manifold_lab.spiral.reference import reference_metrics  # noqa: E402


def _time(fn, repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each of ``repeats`` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return walls, cpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--points", type=int, default=2000)
    p.add_argument("--n-max", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--baseline-trials", type=int, default=2, help="trials per n timed for the loop baselines")
    p.add_argument("--baseline-repeats", type=int, default=3)
    args = p.parse_args()

    x, _ = make_manifold("spiral", args.points)
    dims = list(range(1, args.n_max + 1))
    run = lambda: per_trial_metrics(x, 0, args.trials, args.n_max, "relu")  # noqa: E731
    start = time.perf_counter()
    jax_out = run()
    first = time.perf_counter() - start
    jax_times, jax_cpu = _time(run, args.repeats)

    t = np.asarray(draw_matrices(0, args.baseline_trials, args.n_max, 2))
    scale = args.trials / args.baseline_trials
    rows = [("JAX (jit, float64, scan over n, trial chunks, one thread per core)", jax_times, jax_cpu)]
    for name, per_point in (("NumPy, user loop (per-point lstsq)", True), ("NumPy, loop over n x trials", False)):
        ref = reference_metrics(x, t, dims, "relu", per_point_lstsq=per_point)
        diff = np.abs(ref - jax_out[:, :, : args.baseline_trials]).max()
        walls, cpus = _time(lambda: reference_metrics(x, t, dims, "relu", per_point), args.baseline_repeats)
        rows.append((f"{name} [scaled from {args.baseline_trials} trials/n; max |diff| vs JAX {diff:.1e}]",
                     [w * scale for w in walls], [c * scale for c in cpus]))

    jax_median = statistics.median(jax_times)
    print(f"spiral sweep: n = 1..{args.n_max} x {args.trials} trials x {args.points} points (relu, d = 2)")
    print(f"machine: {os.cpu_count()} CPUs ({platform.machine()}), JAX {jax.__version__} "
          f"({jax.default_backend()}); JAX first call incl. compilation {first:.2f} s")
    print(f"{'implementation':<100} {'median s':>9} {'spread (min-max) s':>19} {'CPU s':>9} {'x JAX':>8}")
    for name, times, cpus in rows:
        med = statistics.median(times)
        print(f"{name:<100} {med:>9.3f} {min(times):>9.3f}-{max(times):<9.3f} "
              f"{statistics.median(cpus):>9.3f} {med / jax_median:>8.1f}")


if __name__ == "__main__":
    main()
