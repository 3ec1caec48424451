"""Figures: the Fig. 1 panels (``spiral.png``) and collapsed fraction against n (``spiral_theorem.png``).
Both functions return the matplotlib Figure (the caller saves and closes it)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from manifold_lab.spiral.experiment import SpiralResult

CMAP = "viridis"


def _scatter(fig: Figure, index: int, count: int, points: np.ndarray, colour: np.ndarray, title: str):
    if points.shape[1] == 3:
        ax = fig.add_subplot(1, count, index, projection="3d")
        ax.scatter(points[:, 0], points[:, 1], points[:, 2], c=colour, cmap=CMAP, s=2, linewidths=0)
        ax.view_init(elev=20, azim=-70)
    else:
        ax = fig.add_subplot(1, count, index)
        ax.scatter(points[:, 0], points[:, 1], c=colour, cmap=CMAP, s=2, linewidths=0)
        ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def plot_panels(result: SpiralResult) -> Figure:
    """``Input`` then one ``Output/dim=n`` panel per n: the back-projection ``T^+ act(T x)`` of one
    draw, points coloured by their position along the manifold (as in the paper's Fig. 1)."""
    dims = list(result.back_projections)
    count = len(dims) + 1
    fig = Figure(figsize=(2.6 * count, 3.0), layout="constrained")
    _scatter(fig, 1, count, result.x, result.position, "Input")
    for i, n in enumerate(dims, start=2):
        _scatter(fig, i, count, result.back_projections[n], result.position, f"Output/dim={n}")
    m = result.metrics
    fig.suptitle(f"{m['manifold']} through {m['activation']}(T x), back-projected with T$^+$ "
                 f"(T ~ N(0,1), seed {m['seed']})", fontsize=9)
    return fig


def plot_theorem(result: SpiralResult) -> Figure:
    """Measured collapsed fraction (mean over trials, 95% CI) against n, with Theorem 1; linear and
    logarithmic y axes side by side (trials with no collapse at all have no point on the log axis)."""
    th = result.theorem
    m = result.metrics
    dims = np.asarray(th["dims"])
    mean = np.asarray(th["mean"])
    lo, hi = np.asarray(th["ci95"]).T
    fig = Figure(figsize=(10, 4), layout="constrained")
    for i, log in enumerate((False, True)):
        ax = fig.add_subplot(1, 2, i + 1)
        theory = np.asarray(th["theory"])
        ax.plot(dims, theory, "-", color="tab:orange", label="Theorem 1: $\\sum_{k<d} C(n,k)/2^n$"
                if m["activation"] == "relu" else "expected (binomial)")
        shown = mean > 0 if log else np.ones_like(mean, bool)
        ax.errorbar(dims[shown], mean[shown], yerr=[mean[shown] - lo[shown], hi[shown] - mean[shown]],
                    fmt="o", ms=3, color="tab:blue", capsize=2, label=f"measured (95% CI, {m['trials']} trials)")
        ax.set_xlabel("n (width of the expansion)")
        ax.set_ylabel("collapsed fraction (fewer than d active units)")
        if log:
            ax.set_yscale("log")
            ax.set_ylim(max(theory[theory > 0].min(), 1e-9) / 2, 2)
        ax.set_title(("log scale" if log else "linear scale"), fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Collapsed fraction vs n: {m['manifold']} (d={m['input_dim']}), {m['activation']}, "
                 f"{m['points']} points", fontsize=10)
    return fig
